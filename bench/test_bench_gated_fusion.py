"""The MCDB's dynamic gated fusion (DGF): depthwise 3x3 conv, per-pixel gate from [y ; p], blend, residual.

Variants, one group per (shape, dtype, pass), all on the same weights and inputs:

* ``eager``: the module as the reference model writes it, ``DGF(dim, backend="reference")``
  (concatenate [y ; p], two 1x1 convs, separate GELU/sigmoid/blend ops);
* ``compile``: ``torch.compile`` of that module (compiled before timing);
* ``torch``: ``DGF(dim, backend="torch")``, i.e. our PyTorch path of ``gated_fusion``;
* ``triton``: ``DGF(dim, backend="triton")``, our fused kernels (CUDA only: on CPU they would time
  Triton's interpreter);
* ``copy``: ``dst.copy_(src)`` of one feature map, forward group only: the device's copy bandwidth,
  the yardstick for the others.

Every variant includes the per-image prompt MLP (negligible beside the maps). The residual is passed,
as MCDB does. Shapes (batch 1): the latent of a 224x224 image (384x28x28), 384x128x128 and
48x512x512; ``--quick`` runs one tiny shape. dtype: float32 on CPU and CUDA, bfloat16 on CUDA.

``extra_info``: ``min_mb``, the bytes that must move once (forward: read y, mamba, residual, write
out; backward adds read grad, y, mamba and write dy, dmamba; dresidual is grad itself), and
``gbps`` = min_mb / median time, comparable across variants and with ``copy``.
"""
from __future__ import annotations

import copy

import pytest
import torch

from m2restore.modules.mcdb import DGF
from m2restore_kernels.testing import assert_close_rel

PROMPT_DIM = 512
SHAPES = {"224px-latent": (384, 28, 28), "384x128x128": (384, 128, 128), "48x512x512": (48, 512, 512)}
TINY = {"tiny": (16, 8, 8)}
VARIANTS = ("eager", "compile", "torch", "triton", "copy")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MAPS_MOVED = {"fwd": 4, "fwd_bwd": 9}  # feature maps read or written once, see the module docstring


def pytest_generate_tests(metafunc):
    if "dgf_shape" not in metafunc.fixturenames:
        return
    shapes = TINY if metafunc.config.getoption("--quick") else SHAPES
    metafunc.parametrize("dgf_shape", [pytest.param(s, id=name) for name, s in shapes.items()])


def _modules(dim: int, device, dtype):
    reference = DGF(dim, prompt_dim=PROMPT_DIM, backend="reference").to(device, dtype)
    ours = {b: DGF(dim, prompt_dim=PROMPT_DIM, backend=b).to(device, dtype) for b in ("torch", "triton")}
    for module in ours.values():
        module.load_state_dict(reference.state_dict())
    return {"eager": reference, "compile": torch.compile(reference), **ours}


@pytest.mark.parametrize("passes", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("variant", VARIANTS)
def test_gated_fusion(bench, benchmark, device, quick, dgf_shape, variant, dtype, passes):
    if device.type != "cuda":
        if variant == "triton":
            pytest.skip("Triton path needs CUDA: on CPU it runs the interpreter, which says nothing about speed")
        if dtype != "fp32":
            pytest.skip("bfloat16 is the GPU dtype; CPU runs the model in float32")
        if variant == "compile" and quick:
            pytest.skip("inductor's CPU compile takes tens of seconds: too slow for the quick suite")
    if variant == "copy" and passes == "fwd_bwd":
        pytest.skip("copy is the bandwidth yardstick, timed once in the forward group")
    C, H, W = dgf_shape
    torch_dtype = DTYPES[dtype]
    g = torch.Generator().manual_seed(0)
    y, mamba, residual = (torch.randn(1, C, H, W, generator=g).to(device, torch_dtype) for _ in range(3))
    prompt = torch.randn(1, PROMPT_DIM, generator=g).to(device, torch_dtype)

    if variant == "copy":
        dst = torch.empty_like(y)

        def step():
            return dst.copy_(y)
        moved = 2
    else:
        modules = _modules(C, device, torch_dtype)
        module = modules[variant]
        # The literal module in float64 on the same (rounded) weights and inputs.
        expected = copy.deepcopy(modules["eager"]).double()(y.double(), mamba.double(), prompt.double(),
                                                             residual=residual.double())
        maps = [t.requires_grad_(passes == "fwd_bwd") for t in (y, mamba, residual)]
        grad_out = torch.randn_like(y)

        def step():
            out = module(maps[0], maps[1], prompt, residual=maps[2])
            if passes == "fwd_bwd":
                torch.autograd.grad(out, maps + list(module.parameters()), grad_out)
            return out
        moved = MAPS_MOVED[passes]
        if variant == "compile":
            step()  # compile outside the timed rounds

    benchmark.group = f"gated_fusion {C}x{H}x{W} {dtype} {passes}"
    min_mb = moved * y.numel() * y.element_size() / 2**20
    benchmark.extra_info.update(C=C, H=H, W=W, dtype=dtype, min_mb=float(f"{min_mb:.4g}"))
    out = bench(step, rounds=3 if y.numel() > 5e6 and device.type == "cpu" else None)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gbps"] = float(f"{min_mb * 2**20 / benchmark.stats.stats.median / 1e9:.4g}")
    if variant == "copy":
        assert torch.equal(out, y)
    else:
        err = assert_close_rel(out, expected, "gated_fusion", torch_dtype)
        benchmark.extra_info["rel_err_vs_float64"] = float(f"{err:.3g}")
