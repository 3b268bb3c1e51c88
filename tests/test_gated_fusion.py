"""gated_fusion (the MCDB DGF): both backends against a float64 reference, forward and every gradient.

On a CPU the Triton path runs in Triton's interpreter (root conftest sets TRITON_INTERPRET=1).
"""
from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from m2restore_kernels import gated_fusion, gated_fusion_ref
from m2restore_kernels.testing import assert_close_rel

gf_triton = importlib.import_module("m2restore_kernels.gated_fusion.triton_impl")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NAMES = ("y", "mamba", "prompt_bias", "dw_weight", "dw_bias", "g1_weight", "g1_bias", "g2_weight", "g2_bias",
         "residual")


def make_inputs(B, C, H, W, *, dtype=torch.float32, channels_last=False, residual=True, biases=True, seed=0):
    """The ten arguments, scaled like a trained block (gate logits of order one), as leaf tensors."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    fmap = dict(memory_format=torch.channels_last) if channels_last else {}
    tensors = [
        randn(B, C, H, W), randn(B, C, H, W), randn(B, C, scale=0.5), randn(C, 1, 3, 3, scale=1 / 3),
        randn(C, scale=0.1) if biases else None, randn(C, C, scale=C ** -0.5), randn(C, scale=0.1) if biases else None,
        randn(1, C, scale=C ** -0.5), randn(1, scale=0.1) if biases else None,
        randn(B, C, H, W) if residual else None,
    ]
    out = []
    for i, t in enumerate(tensors):
        if t is None:
            out.append(None)
            continue
        t = t.to(DEVICE, dtype)
        if t.dim() == 4 and i != 3:
            t = t.contiguous(**fmap)
        out.append(t.requires_grad_())
    return out



def check_against_float64(args, backend):
    """Forward and the gradient of every given input, relative error against the float64 reference."""
    dtype = args[0].dtype
    ref_args = [None if t is None else t.detach().double().requires_grad_() for t in args]
    out = gated_fusion(*args[:9], residual=args[9], backend=backend)
    ref = gated_fusion_ref(*ref_args[:9], residual=ref_args[9])
    assert out.dtype == dtype and out.shape == ref.shape
    assert out.stride() == args[0].stride(), "out must keep y's memory format"
    assert_close_rel(out, ref, "gated_fusion", dtype, "forward")

    # The upstream gradient is an input too: both sides get the same one, rounded to dtype (a float64
    # one would charge its rounding, amplified by cancellation in the sums over channels, to the op).
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    present = [i for i, t in enumerate(args) if t is not None]
    grads = torch.autograd.grad(out, [args[i] for i in present], grad_out)
    ref_grads = torch.autograd.grad(ref, [ref_args[i] for i in present], grad_out.double())
    for i, g, r in zip(present, grads, ref_grads):
        assert g.dtype == dtype and g.shape == args[i].shape, NAMES[i]
        assert_close_rel(g, r, "gated_fusion", dtype, f"grad of {NAMES[i]}")


# (B, C, H, W, channels_last, residual, biases): a covering subset of the product
CASES = [
    (1, 16, 1, 1, False, True, True),     # one-pixel image: every tap but the centre is padding
    (3, 48, 7, 33, True, False, True),
    (1, 64, 33, 7, False, True, False),
    (3, 16, 2, 2, True, True, False),
    (1, 48, 33, 33, False, False, True),
    (3, 64, 1, 7, True, True, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}C{}H{}W{}{}{}{}".format(
    *c[:4], "-cl" if c[4] else "", "-res" if c[5] else "", "" if c[6] else "-nobias"))
def test_matches_float64_reference(case, backend, dtype):
    B, C, H, W, channels_last, residual, biases = case
    check_against_float64(make_inputs(B, C, H, W, dtype=dtype, channels_last=channels_last, residual=residual,
                                      biases=biases), backend)


@pytest.mark.parametrize("case", [
    (1, 48, 9, 17, False, True, True),    # 3 tiles of 4 x 32 pixels, cut by the border; 3 channel blocks
    (1, 20, 7, 33, True, False, True),    # C not a multiple of 16: masked channel lanes
    (1, 32, 2, 150, False, True, False),  # 2 x 2 tiles of 1 x 128: halos cross tiles in both directions
])
def test_triton_with_gpu_tiles(case, monkeypatch):
    """The interpreter normally gets one tile per image; here it runs the tile shapes a GPU would use
    (the forward's and the backward's, which differ)."""
    dtype = torch.float32
    real = gf_triton.default_config
    monkeypatch.setattr(gf_triton, "default_config", lambda C, H, W, device, dtype, backward=False:
                        real(C, H, W, torch.device("cuda"), dtype, backward))
    B, C, H, W, channels_last, residual, biases = case
    check_against_float64(make_inputs(B, C, H, W, dtype=dtype, channels_last=channels_last, residual=residual,
                                      biases=biases), "triton")


@settings(max_examples=6, deadline=None, derandomize=True)
@given(B=st.integers(1, 2), C=st.integers(1, 40), H=st.integers(1, 9), W=st.integers(1, 9),
       channels_last=st.booleans(), residual=st.booleans(), biases=st.booleans(),
       backend=st.sampled_from(["torch", "triton"]))
def test_random_shapes(B, C, H, W, channels_last, residual, biases, backend):
    check_against_float64(make_inputs(B, C, H, W, channels_last=channels_last, residual=residual, biases=biases),
                          backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_hand_computed_zero_padding(backend):
    """Gate forced open (G = 1): out = GELU(sum of the in-image 3x3 neighbours) for y = 1 and an all-ones
    kernel, i.e. GELU(4) at corners, GELU(6) on edges, GELU(9) inside; forced shut (G = 0): out = mamba + residual."""
    B, C, H, W = 2, 16, 4, 5
    y = torch.ones(B, C, H, W, device=DEVICE)
    mamba, residual = torch.randn(B, C, H, W, device=DEVICE), torch.randn(B, C, H, W, device=DEVICE)
    ones_kernel, g1 = torch.ones(C, 1, 3, 3, device=DEVICE), torch.zeros(C, C, device=DEVICE)
    pb, g2 = torch.zeros(B, C, device=DEVICE), torch.zeros(1, C, device=DEVICE)
    neighbours = torch.full((H, W), 9.0)
    neighbours[0, :] = neighbours[-1, :] = neighbours[:, 0] = neighbours[:, -1] = 6.0
    neighbours[0, 0] = neighbours[0, -1] = neighbours[-1, 0] = neighbours[-1, -1] = 4.0
    expected_open = (0.5 * neighbours * (1 + torch.erf(neighbours / 2 ** 0.5))).expand(B, C, H, W).to(DEVICE)

    opened = gated_fusion(y, mamba, pb, ones_kernel, None, g1, None, g2, torch.tensor([60.0], device=DEVICE),
                          backend=backend)
    torch.testing.assert_close(opened, expected_open, rtol=1e-6, atol=1e-6)
    shut = gated_fusion(y, mamba, pb, ones_kernel, None, g1, None, g2, torch.tensor([-60.0], device=DEVICE),
                        residual=residual, backend=backend)
    torch.testing.assert_close(shut, mamba + residual, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name, bad", [
    ("mamba", lambda a: a[1][:, :, :-1]),
    ("dw_weight", lambda a: torch.zeros(a[3].shape[0], 1, 5, 5)),
    ("dw_weight", lambda a: torch.zeros(a[3].shape[0], 3, 3)),
    ("prompt_bias", lambda a: a[2][:1]),
    ("g1_weight", lambda a: a[5][:, :-1]),
    ("g2_weight", lambda a: a[7].t()),
    ("residual", lambda a: a[1][:1]),
])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_input_names_the_argument(name, bad, backend):
    args = [None if t is None else t.detach() for t in make_inputs(2, 16, 3, 3, residual=True)]
    args[NAMES.index(name)] = bad(args)
    with pytest.raises(ValueError, match=name):
        gated_fusion(*args[:9], residual=args[9], backend=backend)


def test_float64_is_refused_by_triton_and_computed_by_auto():
    """The Triton kernels compute in float32: float64 with backend="triton" is a ValueError naming the
    dtype and the backend that takes it (not float32-rounded or garbage results), and "auto" runs
    the PyTorch path in float64, even where Triton runs (the interpreter here, a GPU in CI)."""
    args = make_inputs(2, 16, 5, 7, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"does not take torch.float64.*backend='torch'"):
        gated_fusion(*args[:9], residual=args[9], backend="triton")
    check_against_float64(args, "auto")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_reaches_its_pixel_and_its_neighbours_only(backend):
    """A NaN in y at one pixel spoils out there and at its eight neighbours (the 3x3 conv); a NaN in
    mamba only its own pixel; every other output stays finite."""
    B, C, H, W = 1, 16, 6, 7
    args = [t.detach() for t in make_inputs(B, C, H, W)]
    args[0][0, 3, 2, 4] = float("nan")
    args[1][0, 5, 4, 1] = float("nan")
    out = gated_fusion(*args[:9], residual=args[9], backend=backend)
    expected = torch.zeros(H, W, dtype=torch.bool)
    expected[1:4, 3:6] = True
    expected[4, 1] = True
    assert torch.equal(out.isnan().any(1)[0].cpu(), expected)
    assert out.isfinite()[:, :, ~expected.to(DEVICE)].all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_views(backend):
    """MCDB's layouts: y NCHW-contiguous, mamba a permuted (B, H*W, C) sequence; plus a non-dense residual."""
    B, C, H, W = 2, 16, 5, 7
    args = make_inputs(B, C, H, W)
    seq = torch.randn(B, H * W, C, device=DEVICE, requires_grad=True)
    args[1] = seq.reshape(B, H, W, C).permute(0, 3, 1, 2)
    wide = torch.randn(B, C, H, 2 * W, device=DEVICE, requires_grad=True)
    args[9] = wide[..., ::2]
    check_against_float64(args, backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixed_dtypes_compute_in_y_dtype(backend):
    """float16 y with float32 mamba and residual (the kernel converts on load): float16 out, and each
    gradient in its own input's dtype."""
    args = make_inputs(2, 16, 5, 7, dtype=torch.float16)
    args[1], args[9] = (t.detach().float().requires_grad_() for t in (args[1], args[9]))
    ref_args = [t.detach().double().requires_grad_() for t in args]
    out = gated_fusion(*args[:9], residual=args[9], backend=backend)
    ref = gated_fusion_ref(*ref_args[:9], residual=ref_args[9])
    assert out.dtype == torch.float16
    assert_close_rel(out, ref, "gated_fusion", torch.float16, "forward")
    grads = torch.autograd.grad(out.float().sum(), args)
    ref_grads = torch.autograd.grad(ref.sum(), ref_args)
    for name, t, g, r in zip(NAMES, args, grads, ref_grads):
        assert g.dtype == t.dtype, name
        assert_close_rel(g, r, "gated_fusion", torch.float16, f"grad of {name}")


def test_triton_custom_op_passes_opcheck():
    """Schema, fake (meta) kernel, autograd registration and torch.compile tracing of the custom op."""
    args = [None if t is None else t.detach().requires_grad_(t.requires_grad)
            for t in make_inputs(2, 16, 5, 6, channels_last=True)]
    torch.library.opcheck(torch.ops.m2restore_kernels.gated_fusion.default, (*args, "triton"))


def test_torch_compile_matches_eager():
    """Inductor on the forward (its CPU codegen is the slow part, so once); the backward graph through
    AOTAutograd with the eager backend."""
    args = make_inputs(2, 16, 6, 7)

    def fused(*a):
        return gated_fusion(*a[:9], residual=a[9], backend="torch")

    with torch.no_grad():
        torch.testing.assert_close(torch.compile(fused, fullgraph=True)(*args), fused(*args), rtol=1e-5, atol=1e-5)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")(*args)
    eager = fused(*args)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(compiled.square().sum(), args)
    eager_grads = torch.autograd.grad(eager.square().sum(), args)
    for name, g, e in zip(NAMES, grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=name)


def test_autocast_cpu_torch_path():
    """Under autocast the op computes in the autocast dtype; gradients reach the float32 parameters."""
    args = [t.detach().cpu().requires_grad_() for t in make_inputs(2, 16, 5, 5)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gated_fusion(*args[:9], residual=args[9], backend="torch")
    assert out.dtype == torch.bfloat16
    rounded = [t.detach().to(torch.bfloat16).double() for t in args]
    assert_close_rel(out, gated_fusion_ref(*rounded[:9], residual=rounded[9]), "gated_fusion", torch.bfloat16)
    grads = torch.autograd.grad(out.float().sum(), args)
    assert all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES[:3])
def test_triton_bfloat16_cuda(case):
    B, C, H, W, channels_last, residual, biases = case
    check_against_float64(make_inputs(B, C, H, W, dtype=torch.bfloat16, channels_last=channels_last,
                                      residual=residual, biases=biases), "triton")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_autocast_and_compile_cuda(dtype):
    args = make_inputs(2, 48, 28, 28)

    def fused(*a):
        return gated_fusion(*a[:9], residual=a[9], backend="triton")

    with torch.autocast("cuda", dtype=dtype):
        eager = fused(*args)
        compiled = torch.compile(fused, fullgraph=True)(*args)
    assert eager.dtype == compiled.dtype == dtype
    rounded = [t.detach().to(dtype).double() for t in args]
    assert_close_rel(eager, gated_fusion_ref(*rounded[:9], residual=rounded[9]), "gated_fusion", dtype)
    torch.testing.assert_close(compiled, eager)
    grads = torch.autograd.grad(compiled.float().sum(), args)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES[:3])
def test_triton_cuda_default_float32_dots(case, monkeypatch):
    """The package's default float32 gate dots (3xTF32) keep float32 accuracy."""
    monkeypatch.delenv("M2RESTORE_FP32_DOT")
    B, C, H, W, channels_last, residual, biases = case
    check_against_float64(make_inputs(B, C, H, W, channels_last=channels_last, residual=residual,
                                      biases=biases), "triton")
