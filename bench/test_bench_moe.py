"""Sparse expert dispatch of one DDER: top-K routing from the router logits, then the K chosen
expert MLPs per pixel and their combination (N=6 experts, K=2, ``combine="logsumexp"``, the
public code's combine, so every variant computes the same function).

Variants, side by side in one group per (image size, DDER level, pass):

* ``authors``: the public code's style of dispatcher, rewritten: dense gates, pixels gathered
  per expert with Python index ops, each expert run on its slice, outputs stitched back with
  ``exp``, ``index_add`` and ``log``;
* ``dense``: every expert on every pixel, then the same gated ``exp``/``log`` combination;
* ``torch``: our sparse PyTorch path (``backend="torch"``);
* ``triton``: our Triton path (CUDA only: on CPU it would time the interpreter);
* ``triton-graph``: the same forward replayed as a captured CUDA graph, how the model runs it
  (``m2restore bench --graph``): no launch or host overhead. The authors' dispatcher cannot be
  captured (it reads expert counts back to the host), so it has no such row.

Each in float32 and under bf16 autocast (on CPU, too: bf16 GEMMs are several times faster there).

Shapes: the three DDERs of a 224x224 and of a 512x512 image (P pixels of C channels, hidden
int(2.66 C)); ``--quick`` runs one tiny shape. ``extra_info`` records the expert FLOPs and the
minimum bytes moved so GPU numbers can be set against the roofline.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from m2restore.benchmark import capture_cuda_graph
from m2restore_kernels import moe_mlp, moe_mlp_ref, topk_softmax, topk_softmax_ref
from m2restore_kernels.testing import assert_close_rel

N_EXPERTS, TOP_K = 6, 2
# (image side, DDER level) -> (pixels, channels, hidden)
SHAPES = {
    (side, level): ((side >> level) ** 2, 48 << level, int(2.66 * (48 << level)))
    for side in (224, 512) for level in range(3)
}
TINY = (256, 16, 42)
VARIANTS = ("authors", "dense", "torch", "triton", "triton-graph")


def _authors_dispatch(x, logits, w1, b1, w2, b2):
    """The public code's SparseDispatcher pattern: dense (P, N) gates -> per-expert row lists."""
    vals, idx = logits.topk(TOP_K, dim=1)
    gates = torch.zeros_like(logits).scatter(1, idx, torch.softmax(vals, dim=1))
    sorted_experts, index_sorted = torch.nonzero(gates).sort(0)
    _, expert_index = sorted_experts.split(1, dim=1)
    batch_index = torch.nonzero(gates)[index_sorted[:, 1], 0]
    part_sizes = (gates > 0).sum(0).tolist()
    nonzero_gates = torch.gather(gates[batch_index], 1, expert_index)
    expert_inputs = torch.split(x[batch_index], part_sizes, dim=0)
    outs = [F.linear(F.gelu(F.linear(xe, w1[e].t(), b1[e])), w2[e].t(), b2[e])
            for e, xe in enumerate(expert_inputs)]
    stitched = torch.cat(outs, 0).exp() * nonzero_gates
    combined = torch.zeros_like(x).index_add(0, batch_index, stitched)
    return combined.clamp_min(torch.finfo(x.dtype).eps).log()


def _dense_dispatch(x, logits, w1, b1, w2, b2):
    vals, idx = logits.topk(TOP_K, dim=1)
    gates = torch.zeros_like(logits).scatter(1, idx, torch.softmax(vals, dim=1))
    hidden = F.gelu(torch.einsum("pc,nch->nph", x, w1) + b1[:, None])
    outs = torch.baddbmm(b2[:, None], hidden, w2)  # (N, P, C)
    return torch.einsum("pn,npc->pc", gates, outs.exp()).log()


def _ours(backend):
    def run(x, logits, w1, b1, w2, b2):
        weights, indices = topk_softmax(logits, TOP_K, backend=backend)
        # As DDER calls it: router-made indices need no range check (a host sync on CUDA).
        return moe_mlp(x, weights, indices, w1, b1, w2, b2, combine="logsumexp", backend=backend,
                       check_indices=False)
    return run


DISPATCH = {"authors": _authors_dispatch, "dense": _dense_dispatch, "torch": _ours("torch"), "triton": _ours("triton")}


@functools.lru_cache(maxsize=1)
def _float64_reference(shape: tuple, device_type: str) -> torch.Tensor:
    """The function every variant computes, in float64 with the reference ops (cached: all
    variants of a shape share one)."""
    x, logits, *experts = (t.double() for t in _inputs(shape))
    weights, indices = topk_softmax_ref(logits, TOP_K)
    return moe_mlp_ref(x, weights, indices, *experts, combine="logsumexp").to(device_type)


def _inputs(shape: tuple) -> list:
    """x (P, C), router logits (P, N) and the experts (w1, b1, w2, b2), float32 on the CPU."""
    P, C, Hd = shape
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(P, C, generator=g),
        torch.randn(P, N_EXPERTS, generator=g),
        torch.randn(N_EXPERTS, C, Hd, generator=g) / C ** 0.5,
        0.1 * torch.randn(N_EXPERTS, Hd, generator=g),
        torch.randn(N_EXPERTS, Hd, C, generator=g) / Hd ** 0.5,
        0.1 * torch.randn(N_EXPERTS, C, generator=g),
    ]


def pytest_generate_tests(metafunc):
    if "moe_shape" not in metafunc.fixturenames:
        return
    shapes = {"tiny": TINY} if metafunc.config.getoption("--quick") else {
        f"{side}px-dder{level + 1}": shape for (side, level), shape in SHAPES.items()}
    metafunc.parametrize("moe_shape", [pytest.param(s, id=name) for name, s in shapes.items()])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("passes", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_moe_dispatch(bench, benchmark, device, moe_shape, variant, passes, dtype):
    if variant.startswith("triton") and device.type != "cuda":
        pytest.skip("Triton path needs CUDA: on CPU it runs the interpreter, which says nothing about speed")
    if variant == "triton-graph" and passes == "fwd_bwd":
        pytest.skip("the graph variant times the forward only")
    P, C, Hd = moe_shape
    params = [t.to(device).requires_grad_(passes == "fwd_bwd") for t in _inputs(moe_shape)]
    fn = DISPATCH[variant.removesuffix("-graph")]

    def forward(x):
        # No autocast weight cache: a captured graph must not keep casts made outside it.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16", cache_enabled=False):
            return fn(x, *params[1:])

    def eager_step():
        y = forward(params[0])
        if passes == "fwd_bwd":
            torch.autograd.grad(y.sum(), params)
        return y

    step = eager_step
    if variant == "triton-graph":
        step = functools.partial(capture_cuda_graph(forward, params[0]), params[0])

    benchmark.group = f"moe {P}x{C} hidden {Hd} {passes} {dtype}"
    experts_run = N_EXPERTS if variant == "dense" else TOP_K
    benchmark.extra_info.update(
        P=P, C=C, Hd=Hd, N=N_EXPERTS, K=TOP_K,
        # two GEMMs per expert run on a pixel; the backward does twice the forward's GEMM work
        gflop=2 * P * experts_run * 2 * C * Hd * (3 if passes == "fwd_bwd" else 1) / 1e9,
        # x in, y out, logits in, expert weights in (float32): the forward's lower bound on traffic
        min_mb=4 * (2 * P * C + P * N_EXPERTS + N_EXPERTS * (2 * C * Hd + Hd + C)) / 2**20,
    )
    y = bench(step, rounds=3 if P * C > 5e6 and device.type == "cpu" else None)
    # The bf16 tolerance for every variant under autocast: its GEMMs run in bfloat16.
    err = assert_close_rel(y, _float64_reference(tuple(moe_shape), device.type), "moe_mlp", dtype)
    benchmark.extra_info["rel_err_vs_float64"] = float(f"{err:.3g}")


# ---------------------------------------------------------------------------------------------
# A transformers Mixtral sparse MoE block: transformers' own expert loop against the one-call patch
# ---------------------------------------------------------------------------------------------
# (tokens, hidden C, expert hidden Hd, experts N, top K); --quick: a tiny one.
MIXTRAL_BLOCK = (2048, 256, 512, 8, 2)
MIXTRAL_TINY = (64, 32, 64, 8, 2)


@functools.lru_cache(maxsize=2)
def _mixtral_block(shape: tuple):
    """transformers' MixtralSparseMoeBlock (SwiGLU experts, fused gate_up_proj in nn.Linear layout,
    softmax-then-top-K routing) with random float32 weights, and its input (1, tokens, C)."""
    transformers = pytest.importorskip("transformers")
    from m2restore_kernels.integrations.transformers import BACKEND_ATTRIBUTE, register

    tokens, C, Hd, N, K = shape
    register()
    config = transformers.MixtralConfig(hidden_size=C, intermediate_size=Hd, num_local_experts=N,
                                        num_experts_per_tok=K, experts_implementation="eager")
    torch.manual_seed(0)
    block = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(config)
    # What "auto" runs on a CPU outside the tests (where TRITON_INTERPRET=1 would pick the interpreter).
    setattr(block.experts, BACKEND_ATTRIBUTE, "torch")
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
    return block, torch.randn(1, tokens, C, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("passes", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("implementation", ["eager", "m2restore"])
def test_mixtral_block(bench, benchmark, device, quick, implementation, passes):
    """``eager``: transformers' expert loop (one-hot masks, a Python loop over the hit experts,
    index_add); ``m2restore``: the same block after the one-call patch (moe_mlp, swiglu, layout
    "linear"). Float32 on the CPU (bf16 only where the CPU has native bf16: not timed here)."""
    if device.type != "cpu":
        pytest.skip("the CPU comparison: on CUDA transformers picks grouped_mm, not the eager loop")
    shape = MIXTRAL_TINY if quick else MIXTRAL_BLOCK
    block, x = _mixtral_block(shape)
    block.experts.config._experts_implementation = implementation  # what set_experts_implementation flips
    params = [x.requires_grad_(passes == "fwd_bwd"), *block.parameters()]

    def step():
        with torch.set_grad_enabled(passes == "fwd_bwd"):
            y = block(x)
            if passes == "fwd_bwd":
                torch.autograd.grad(y.sum(), params)
        return y.detach()

    tokens, C, Hd, N, K = shape
    benchmark.group = f"mixtral block {tokens}x{C} hidden {Hd} N{N} K{K} {passes} fp32"
    benchmark.extra_info.update(tokens=tokens, C=C, Hd=Hd, N=N, K=K)
    y = bench(step)
    block.experts.config._experts_implementation = "eager"
    with torch.no_grad():
        want = block(x)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)
