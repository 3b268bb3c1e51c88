"""topk_softmax and moe_mlp: both backends against float64 references, gradients, bad input,
torch.compile / torch.export. On CPU the Triton path runs in the interpreter (TRITON_INTERPRET=1)."""
from __future__ import annotations

import importlib
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from m2restore_kernels.moe import (cv_squared, importance, moe_mlp, moe_mlp_ref, noisy_topk_load, router_z_loss,
                                   topk_softmax, topk_softmax_ref)
from m2restore_kernels.testing import assert_close_rel

from m2restore_kernels._backend import DISABLE_ENV, native_ready

moe_native = importlib.import_module("m2restore_kernels.moe.native_impl")
moe_torch = importlib.import_module("m2restore_kernels.moe.torch_impl")
moe_triton = importlib.import_module("m2restore_kernels.moe.triton_impl")

BACKENDS = ("torch", "triton")
# With CUDA the sweep runs there (Triton compiled for the GPU); else on CPU, Triton interpreted.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """These shapes are tiny: on a shared CPU, intra-op threads only add barrier waits (3x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



def make_experts(N: int, C: int, Hd: int, bias: bool = True, seed: int = 0, gated: bool = False,
                 layout: str = "stacked"):
    """float64 (w1, b1, w2, b2) scaled so hidden and outputs stay O(1); gated: w1 has 2*Hd hidden
    columns; layout "linear": nn.Linear's (N, out, in), contiguous as a Linear keeps it."""
    g = torch.Generator().manual_seed(seed)
    H1 = 2 * Hd if gated else Hd
    w1 = torch.randn(N, C, H1, generator=g, dtype=torch.float64) / math.sqrt(C)
    w2 = torch.randn(N, Hd, C, generator=g, dtype=torch.float64) / math.sqrt(Hd)
    b1 = 0.5 * torch.randn(N, H1, generator=g, dtype=torch.float64) if bias else None
    b2 = 0.5 * torch.randn(N, C, generator=g, dtype=torch.float64) if bias else None
    if layout == "linear":
        w1, w2 = w1.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()
    return w1, b1, w2, b2


def check_moe(backend, dtype, x, weights, indices, experts, combine, **form):
    """Forward and every gradient of moe_mlp in ``dtype`` against moe_mlp_ref in float64 on the
    same (rounded) inputs, all on DEVICE; ``form``: activation= and layout= for both."""
    x, weights, indices = x.to(DEVICE), weights.to(DEVICE), indices.to(DEVICE)
    experts = [t.to(DEVICE) if t is not None else None for t in experts]
    inputs = [t.to(dtype) if t is not None else None for t in (x, weights, *experts)]
    ref_in = [t.double().requires_grad_() if t is not None else None for t in inputs]
    got_in = [t.clone().requires_grad_() if t is not None else None for t in inputs]
    ref = moe_mlp_ref(ref_in[0], ref_in[1], indices, *ref_in[2:], combine=combine, **form)
    got = moe_mlp(got_in[0], got_in[1], indices, *got_in[2:], combine=combine, backend=backend, **form)
    assert got.dtype == dtype and got.shape == ref.shape
    assert_close_rel(got, ref, "moe_mlp", dtype, "y")
    # The upstream gradient is an input too: the same one, rounded to dtype, for both sides.
    dy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    wrt = [i for i, t in enumerate(ref_in) if t is not None]
    ref_g = torch.autograd.grad(ref, [ref_in[i] for i in wrt], dy.double())
    got_g = torch.autograd.grad(got, [got_in[i] for i in wrt], dy)
    names = ["x", "weights", "w1", "b1", "w2", "b2"]
    for i, rg, gg in zip(wrt, ref_g, got_g):
        assert gg.dtype == dtype, names[i]
        # Gradients come in their parameters' own layout (no transposed copy for autograd to make).
        assert gg.stride() == got_in[i].stride(), names[i]
        assert_close_rel(gg, rg, "moe_mlp", dtype, f"grad of {names[i]}")


def route(logits: torch.Tensor, k: int):
    """float64 top-K gate weights and indices from the reference."""
    return topk_softmax_ref(logits.double(), k)


# ---------------------------------------------------------------------------------------------
# topk_softmax
# ---------------------------------------------------------------------------------------------
@pytest.fixture(params=["torch", "torch-pytorch-ops", "triton"])
def topk_backend(request, monkeypatch):
    """Backends of topk_softmax; on CPU the torch path runs a C loop (csrc/moe_cpu.c) where it
    builds, so "torch-pytorch-ops" also covers the PyTorch ops it falls back to."""
    if request.param == "torch-pytorch-ops":
        monkeypatch.setenv(DISABLE_ENV, "native")
        return "torch"
    if request.param == "torch" and DEVICE.type == "cpu" and not native_ready(moe_native.LIBRARY):
        pytest.skip("the C top-K needs a working C compiler")
    return request.param


def _routing_ref(logits: torch.Tensor, k: int, routing: str, renormalize: bool):
    """float64 weights, indices and (K+1)-th logit of each routing form, written out from a sort."""
    vals, idx = torch.sort(logits, dim=1, descending=True, stable=True)
    if routing == "softmax_topk":
        probs = torch.softmax(logits, dim=1).gather(1, idx[:, :k])
        weights = probs / probs.sum(1, keepdim=True) if renormalize else probs
    else:
        weights = torch.softmax(vals[:, :k], dim=1)
    nxt = vals[:, k] if k < logits.shape[1] else torch.full_like(vals[:, 0], float("-inf"))
    return weights, idx[:, :k], nxt


@pytest.mark.parametrize("routing,renormalize", [("topk_softmax", True), ("softmax_topk", True),
                                                 ("softmax_topk", False)])
@pytest.mark.parametrize("N,k", [(6, 2), (8, 8), (64, 5)])
def test_routing_forms_and_next_logit(topk_backend, routing, renormalize, N, k):
    """Mixtral's softmax-then-top-K (renormalised: Mixtral; not: Qwen2-MoE, OLMoE) and M2Restore's
    top-K-then-softmax, with the (K+1)-th logit, against the float64 formulas; gradients too."""
    logits = torch.randn(97, N, generator=torch.Generator().manual_seed(N + k), dtype=torch.float64).to(DEVICE)
    ref_in, got_in = logits.clone().requires_grad_(), logits.float().requires_grad_()
    w_ref, i_ref, n_ref = _routing_ref(ref_in, k, routing, renormalize)
    w, i, nxt = topk_softmax(got_in, k, backend=topk_backend, routing=routing, renormalize=renormalize,
                             return_next=True)
    assert torch.equal(i, i_ref) and w.dtype == nxt.dtype == torch.float32 and nxt.shape == (97,)
    assert_close_rel(w, w_ref, "topk_softmax", torch.float32, "weights")
    assert torch.equal(nxt.double(), n_ref.float().double())
    w2, i2 = topk_softmax(got_in, k, backend=topk_backend, routing=routing, renormalize=renormalize)
    assert torch.equal(i2, i) and torch.allclose(w2, w, rtol=1e-6, atol=1e-7)
    g = torch.Generator().manual_seed(4)
    dw, dn = torch.randn(w.shape, generator=g, dtype=torch.float64), torch.randn(97, generator=g, dtype=torch.float64)
    loss_ref = (w_ref * dw.to(DEVICE)).sum() + (n_ref.nan_to_num(neginf=0.0) * dn.to(DEVICE)).sum()
    loss = (w * dw.float().to(DEVICE)).sum() + (nxt.nan_to_num(neginf=0.0) * dn.float().to(DEVICE)).sum()
    (g_ref,) = torch.autograd.grad(loss_ref, ref_in)
    (g_got,) = torch.autograd.grad(loss, got_in)
    assert_close_rel(g_got, g_ref, "topk_softmax", torch.float32, "grad of logits")


def test_noisy_topk_load_importance_and_z_loss():
    """The load helpers against the noisy top-K formulas in float64, from a second top-K(K+1)."""
    g = torch.Generator().manual_seed(8)
    P, N, k = 50, 6, 2
    clean = torch.randn(P, N, generator=g, dtype=torch.float64, requires_grad=True)
    std = torch.rand(P, N, generator=g, dtype=torch.float64) + 0.1
    noisy = clean + std * torch.randn(P, N, generator=g, dtype=torch.float64)
    top, _ = noisy.topk(k + 1, dim=1)
    is_in = noisy > top[:, k:]
    normal = torch.distributions.Normal(0.0, 1.0)
    want = torch.where(is_in, normal.cdf((clean - top[:, k:]) / std), normal.cdf((clean - top[:, k - 1:k]) / std)).sum(0)
    w, i, nxt = topk_softmax(noisy, k, return_next=True)
    got = noisy_topk_load(clean, noisy, std, i, nxt)
    assert torch.allclose(got, want, rtol=1e-12)
    (g_want,) = torch.autograd.grad(want.square().sum(), clean)
    (g_got,) = torch.autograd.grad(got.square().sum(), clean)
    assert torch.allclose(g_got, g_want, rtol=1e-10)
    dense = torch.zeros(P, N, dtype=torch.float64).scatter(1, i, w)
    assert torch.allclose(importance(w, i, N), dense.sum(0), rtol=1e-12)
    assert torch.allclose(router_z_loss(noisy), (torch.logsumexp(noisy, 1) ** 2).mean(), rtol=1e-12)


@pytest.mark.parametrize("keep_prob", [0.0, 0.3, 1.0])
def test_noisy_topk_load_with_masked_noise_and_cv_squared(keep_prob):
    """keep_prob (the Bernoulli mask on the noise) against the estimator written pixel by pixel in
    float64: thr = the k-th largest noisy logit of the other experts, load = sum over pixels of
    q * Phi((clean - thr) / std) + (1 - q) * [clean > thr]; and cv_squared against var / mean^2."""
    g = torch.Generator().manual_seed(9)
    P, N, k = 24, 5, 2
    clean = torch.randn(P, N, generator=g, dtype=torch.float64)
    std = torch.rand(P, N, generator=g, dtype=torch.float64) + 0.1
    noisy = clean + std * torch.randn(P, N, generator=g, dtype=torch.float64)
    want = [0.0] * N
    for p in range(P):
        for n in range(N):
            thr = sorted((noisy[p, m].item() for m in range(N) if m != n), reverse=True)[k - 1]
            c = clean[p, n].item()
            phi = 0.5 * (1 + math.erf((c - thr) / std[p, n].item() / math.sqrt(2)))
            want[n] += keep_prob * phi + (1 - keep_prob) * (c > thr)
    _, i, nxt = topk_softmax(noisy, k, backend="torch", return_next=True)
    got = noisy_topk_load(clean, noisy, std, i, nxt, keep_prob=keep_prob)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    got32 = noisy_topk_load(clean.float(), noisy.float(), std.float(), i, nxt.float(), keep_prob=keep_prob)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), got, rtol=1e-5, atol=1e-5)
    mean = sum(want) / N
    var = sum((v - mean) ** 2 for v in want) / (N - 1)
    assert cv_squared(got, eps=0.0).item() == pytest.approx(var / mean ** 2, rel=1e-12)
    counts = torch.tensor([3, 1, 2])  # integer counts are promoted: mean 2, unbiased var 1
    assert cv_squared(counts).dtype == torch.float32 and cv_squared(counts).item() == pytest.approx(0.25, rel=1e-6)
    with pytest.raises(ValueError, match="keep_prob"):
        noisy_topk_load(clean, noisy, std, i, nxt, keep_prob=1.5)


@pytest.mark.parametrize("N,k", [(1, 1), (4, 2), (6, 2), (6, 6), (8, 1), (8, 8), (64, 5)])
def test_topk_softmax_matches_reference(topk_backend, N, k):
    backend = topk_backend
    logits = torch.randn(203, N, generator=torch.Generator().manual_seed(N * 10 + k), dtype=torch.float64).to(DEVICE)
    ref_in = logits.clone().requires_grad_()
    got_in = logits.float().requires_grad_()
    w_ref, i_ref = topk_softmax_ref(ref_in, k)
    w, i = topk_softmax(got_in, k, backend=backend)
    assert i.dtype == torch.int64 and torch.equal(i, i_ref)
    assert w.dtype == torch.float32
    assert_close_rel(w, w_ref, "topk_softmax", torch.float32, "weights")
    dw = torch.randn(w.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(DEVICE)
    (g_ref,) = torch.autograd.grad(w_ref, ref_in, dw)
    (g,) = torch.autograd.grad(w, got_in, dw.float())
    assert_close_rel(g, g_ref, "topk_softmax", torch.float32, "grad of logits")
    dropped = torch.ones_like(logits, dtype=torch.bool).scatter_(1, i, False)
    assert (g[dropped] == 0).all()


def test_topk_softmax_ties_go_to_lower_index(topk_backend):
    backend = topk_backend
    inf = float("inf")
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0],
                           [2.0, 2.0, 2.0, 2.0, 2.0],
                           [-1.0, 5.0, -1.0, 5.0, -1.0],
                           [-inf, 0.0, -inf, -inf, -inf]], device=DEVICE)
    w, i = topk_softmax(logits, 3, backend=backend)
    assert i.tolist() == [[1, 2, 4], [0, 1, 2], [1, 3, 0], [1, 0, 2]]
    e = math.exp(-6.0)
    expected = torch.tensor([[1 / 3] * 3, [1 / 3] * 3, [1 / (2 + e), 1 / (2 + e), e / (2 + e)], [1.0, 0.0, 0.0]],
                            device=DEVICE)
    torch.testing.assert_close(w, expected, rtol=1e-6, atol=1e-7)


NAN, INF = float("nan"), float("inf")


def assert_routing_rules(logits: torch.Tensor, k: int, w: torch.Tensor, i: torch.Tensor):
    """topk_softmax's contract, checked against the reference: K distinct indices in [0, N) per row,
    equal to the reference's; the reference's weights, NaN exactly where it has NaN."""
    N = logits.shape[1]
    assert i.dtype == torch.int64 and w.dtype == logits.dtype and w.shape == i.shape == (logits.shape[0], k)
    assert ((i >= 0) & (i < N)).all()
    assert (i.sort(1).values.diff(dim=1) > 0).all(), "indices repeat within a row"
    w_ref, i_ref = topk_softmax_ref(logits.double(), k)
    assert torch.equal(i.cpu(), i_ref.cpu())
    # w's own dtype sets the tolerance: the float64 defaults would allow float32 weights about 1 ulp,
    # and a vectorised expf is 2 ulp from the exact value.
    tol = dict(rtol=1.3e-6, atol=1e-5) if logits.dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(w.double().cpu(), w_ref.cpu(), equal_nan=True, **tol)


@pytest.mark.parametrize("N", [4, 80], ids=["N4-c-loop", "N80-over-the-c-loop"])
def test_topk_softmax_nan_logits_rank_first_and_stay_visible(topk_backend, N):
    """The issue's cases: NaN logits gave repeated indices ([3, 2, 0, 3], all-NaN [2, 1, 2]) on the
    torch path and index N or more on Triton ([3, 2, 0, 4]; all-NaN rows 4 or 128). NaN ranks above
    +inf (torch.sort's order), ties go to the lower index, and the row's weights are NaN."""
    logits = torch.full((3, N), -5.0)
    logits[0, :4] = torch.tensor([0.0, NAN, 1.0, 2.0])
    logits[1] = NAN
    logits[2, N - 1], logits[2, 1] = NAN, NAN  # two NaNs: the lower index first
    w, i = topk_softmax(logits.to(DEVICE), 4, backend=topk_backend)
    assert i.tolist() == [[1, 3, 2, 0], [0, 1, 2, 3], [1, N - 1, 0, 2]]
    assert w.isnan().all()
    w3, i3 = topk_softmax(logits[1:2].to(DEVICE), 3, backend=topk_backend)
    assert i3.tolist() == [[0, 1, 2]] and w3.isnan().all()
    assert_routing_rules(logits.to(DEVICE), 4, w, i)


def test_topk_softmax_infinities(topk_backend):
    """+inf ranks below NaN and above every finite logit; a row that keeps a +inf, or keeps only
    -inf, gets NaN weights (torch.softmax's answer); a kept -inf below a finite max gets weight 0;
    -0.0 equals 0.0 (a tie, the lower index first)."""
    logits = torch.tensor([[INF, 1.0, INF, -INF],
                           [-INF, -INF, 0.0, -0.0],
                           [-INF, -INF, -INF, -INF],
                           [-0.0, 0.0, -INF, -INF],
                           [2.0, -INF, NAN, INF]], device=DEVICE)
    w, i = topk_softmax(logits, 3, backend=topk_backend)
    assert i.tolist() == [[0, 2, 1], [2, 3, 0], [0, 1, 2], [0, 1, 2], [2, 3, 0]]
    nan_rows = w.isnan().all(1).tolist()
    assert nan_rows == [True, False, True, False, True] and not w[[1, 3]].isnan().any()
    assert w[[1, 3]].tolist() == [[0.5, 0.5, 0.0]] * 2
    assert_routing_rules(logits, 3, w, i)


def test_topk_softmax_nan_gradient_stays_in_its_row(topk_backend):
    logits = torch.randn(40, 6, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    logits[::7, 2] = NAN
    logits.requires_grad_()
    w, i = topk_softmax(logits, 2, backend=topk_backend)
    (g,) = torch.autograd.grad(w, logits, torch.ones_like(w))
    spoilt = torch.zeros(40, dtype=torch.bool, device=DEVICE)
    spoilt[::7] = True
    assert g[spoilt].gather(1, i[spoilt]).isnan().all() and g[~spoilt].isfinite().all()


def _backend_variants():
    """(backend, M2RESTORE_KERNELS_DISABLE) for every topk_softmax implementation that runs here."""
    variants = [("triton", ""), ("torch", "native")]
    if DEVICE.type == "cpu" and native_ready(moe_native.LIBRARY):
        variants.append(("torch", ""))
    return variants


SPECIAL = st.sampled_from([NAN, -NAN, INF, -INF, 0.0, -0.0, 1.0, -1.0, 2.5])


@settings(max_examples=40, deadline=None)
@given(P=st.integers(1, 5), N=st.integers(1, 80), data=st.data(),
       dtype=st.sampled_from([torch.float32, torch.float16]))
def test_topk_softmax_sweep_of_nan_inf_and_ties(P, N, data, dtype):
    """Logits mixing NaN (both signs), +-inf, +-0 and repeated values: on every backend the indices
    are distinct, in range and the reference's, and the weights are the reference's, NaN included.
    N up to 80 covers the C loop (N <= 64) and the PyTorch ops beyond it."""
    k = data.draw(st.integers(1, N), label="k")
    values = data.draw(st.lists(st.one_of(SPECIAL, st.floats(-4, 4, width=16)), min_size=P * N, max_size=P * N),
                       label="logits")
    logits = torch.tensor(values, dtype=dtype).view(P, N).to(DEVICE)
    for backend, disabled in _backend_variants():
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(DISABLE_ENV, disabled)
            w, i = topk_softmax(logits, k, backend=backend)
        assert_routing_rules(logits, k, w, i)


@pytest.mark.parametrize("disabled", ["", "native"], ids=["c-loop-allowed", "pytorch-ops"])
def test_topk_softmax_float64_selects_and_normalises_in_float64(disabled, monkeypatch):
    """float64 logits that round to equal float32 values: [1, 1 + 1e-12, 0.5] picked index 0 and
    [0, 1e-300, -1e-300] index 0 when the selection ran in float32. Forward and backward in float64."""
    monkeypatch.setenv(DISABLE_ENV, disabled)
    logits = torch.tensor([[1.0, 1 + 1e-12, 0.5], [0.0, 1e-300, -1e-300]], dtype=torch.float64,
                          device=DEVICE, requires_grad=True)
    w, i = topk_softmax(logits, 2, backend="auto")
    assert i.tolist() == [[1, 0], [1, 0]] and w.dtype == torch.float64
    w_ref, _ = topk_softmax_ref(logits, 2)
    assert w[0, 0].item() - w[0, 1].item() == pytest.approx(math.tanh(0.5e-12), rel=1e-3)
    torch.testing.assert_close(w, w_ref, rtol=1e-15, atol=0)
    dw = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64, device=DEVICE)
    (g,) = torch.autograd.grad(w, logits, dw)
    (g_ref,) = torch.autograd.grad(w_ref, logits, dw)
    torch.testing.assert_close(g, g_ref, rtol=1e-14, atol=1e-16)
    assert torch.equal(topk_softmax(logits.detach(), 2, backend="torch")[1], i)


def test_float64_on_triton_is_refused_with_the_backend_that_takes_it():
    """The Triton kernels compute in float32: float64 through them returned zeros, 1e305 or inf."""
    logits = torch.randn(4, 6, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match=r"topk_softmax: backend='triton' does not take torch.float64.*'torch'"):
        topk_softmax(logits, 2, backend="triton")
    x, weights, indices, experts = _routing_case("dder_like")
    with pytest.raises(ValueError, match=r"moe_mlp: backend='triton' does not take torch.float64.*'torch'"):
        moe_mlp(x.to(DEVICE), weights.to(DEVICE), indices.to(DEVICE), *[t.to(DEVICE) for t in experts],
                backend="triton")


@pytest.mark.parametrize("combine", ["sum", "logsumexp"])
def test_moe_mlp_float64_auto_computes_in_float64(combine):
    """backend="auto" with float64 runs the PyTorch path in float64 (even where Triton runs: the
    interpreter here, a GPU in CI), combination and gradients included."""
    x, weights, indices, experts = _routing_case("k_equals_n_two_hidden_chunks")
    check_moe("auto", torch.float64, x, weights, indices, experts, combine)


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_mlp_after_nan_routing_spoils_only_those_rows(backend):
    """The model's path: topk_softmax then moe_mlp with check_indices=False. Rows with a NaN logit
    get NaN outputs (their weights are NaN); their indices stay in range, so every other row is the
    reference's."""
    x, _, _, experts = _routing_case("dder_like")
    logits = torch.randn(x.shape[0], 6, generator=torch.Generator().manual_seed(4))
    logits[::5, 3] = NAN
    logits[1] = NAN
    weights, indices = topk_softmax(logits.to(DEVICE), 2, backend=backend)
    y = moe_mlp(x.float().to(DEVICE), weights, indices, *[t.float().to(DEVICE) for t in experts],
                backend=backend, check_indices=False)
    spoilt = logits.isnan().any(1)
    assert y[spoilt.to(DEVICE)].isnan().all()
    ref = moe_mlp_ref(x[~spoilt], *route(logits[~spoilt], 2), *experts)
    assert_close_rel(y[(~spoilt).to(DEVICE)].cpu(), ref, "moe_mlp", torch.float32, "rows without NaN")


def test_topk_softmax_float16(topk_backend):
    backend = topk_backend
    logits = torch.randn(150, 6, generator=torch.Generator().manual_seed(5)).half().to(DEVICE)
    w_ref, i_ref = topk_softmax_ref(logits.double(), 2)
    w, i = topk_softmax(logits, 2, backend=backend)
    assert w.dtype == torch.float16 and torch.equal(i, i_ref)
    assert_close_rel(w, w_ref, "topk_softmax", torch.float16, "weights")


# ---------------------------------------------------------------------------------------------
# moe_mlp
# ---------------------------------------------------------------------------------------------
def _routing_case(name: str):
    """(x, weights, indices, experts) in float64 for the named covering case."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    if name == "one_expert_many_blocks":  # N=1, K=1; 300 rows span several row blocks
        P, C, Hd, N, K = 300, 16, 23, 1, 1
        logits = torch.randn(P, N, generator=g, dtype=torch.float64)
    elif name == "dder_like":  # the first DDER's widths
        P, C, Hd, N, K = 133, 48, 127, 6, 2
        logits = torch.randn(P, N, generator=g, dtype=torch.float64)
    elif name == "k_equals_n_two_hidden_chunks":
        P, C, Hd, N, K = 70, 96, 150, 4, 4
        logits = torch.randn(P, N, generator=g, dtype=torch.float64)
    elif name == "unused_expert":  # expert 3 of 8 is never picked
        P, C, Hd, N, K = 101, 16, 40, 8, 2
        logits = torch.randn(P, N, generator=g, dtype=torch.float64)
        logits[:, 3] = -1e9
    elif name == "all_to_one_expert":  # every pixel goes to expert 2 alone; 0, 1 and 3 idle
        P, C, Hd, N, K = 90, 48, 33, 4, 1
        logits = torch.randn(P, N, generator=g, dtype=torch.float64)
        logits[:, 2] = 10.0
    elif name == "ties":  # every logit equal: experts 0 and 1 everywhere, weights 1/2
        P, C, Hd, N, K = 45, 16, 20, 6, 2
        logits = torch.zeros(P, N, dtype=torch.float64)
    x = torch.randn(P, C, generator=g, dtype=torch.float64)
    weights, indices = route(logits, K)
    return x, weights, indices, make_experts(N, C, Hd, seed=P)


CASES = ["one_expert_many_blocks", "dder_like", "k_equals_n_two_hidden_chunks", "unused_expert",
         "all_to_one_expert", "ties"]


@pytest.mark.parametrize("case,dtype", [("dder_like", torch.float32), ("unused_expert", torch.float32),
                                        ("all_to_one_expert", torch.float32),
                                        ("one_expert_many_blocks", torch.float16), ("dder_like", torch.float16)])
def test_triton_with_gpu_tiles(case, dtype, monkeypatch):
    """The interpreter normally gets 128-row blocks and whole hidden widths; here it runs the GPU's
    tiles (16 rows in float32; in 16-bit 128 rows forward and 64 backward at these widths, 32 hidden
    units per step), so experts span several blocks and each program must find its own from the
    offsets."""
    real = moe_triton.default_config
    monkeypatch.setattr(moe_triton, "default_config", lambda n_assign, n_experts, C, Hd, device, dtype, **kw:
                        real(n_assign, n_experts, C, Hd, torch.device("cuda"), dtype, shared_memory=232448, **kw))
    x, weights, indices, experts = _routing_case(case)
    check_moe("triton", dtype, x, weights, indices, experts, "logsumexp")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("combine", ["sum", "logsumexp"])
@pytest.mark.parametrize("case", CASES)
def test_moe_mlp_float32(case, combine, backend):
    x, weights, indices, experts = _routing_case(case)
    if case == "unused_expert":
        assert not (indices == 3).any()
    if case == "all_to_one_expert":
        assert (indices == 2).all()
    if case == "ties":
        assert (indices == torch.tensor([0, 1])).all() and (weights == 0.5).all()
    check_moe(backend, torch.float32, x, weights, indices, experts, combine)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,combine", [("dder_like", "sum"), ("k_equals_n_two_hidden_chunks", "logsumexp")])
def test_moe_mlp_float16(case, combine, backend):
    x, weights, indices, experts = _routing_case(case)
    check_moe(backend, torch.float16, x, weights, indices, experts, combine)


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_mlp_without_biases_and_repeated_experts(backend):
    """No biases; indices not from top-K, so a pixel may use the same expert twice."""
    g = torch.Generator().manual_seed(11)
    P, C, Hd, N, K = 64, 16, 19, 3, 3
    x = torch.randn(P, C, generator=g, dtype=torch.float64)
    indices = torch.randint(0, N, (P, K), generator=g)
    weights = torch.rand(P, K, generator=g, dtype=torch.float64) + 0.1
    assert (indices[:, 0] == indices[:, 1]).any()
    check_moe(backend, torch.float32, x, weights, indices, make_experts(N, C, Hd, bias=False), "sum")


@pytest.mark.parametrize("combine", ["sum", "logsumexp"])
@pytest.mark.parametrize("native", [True, False], ids=["native-combine", "torch-combine"])
def test_torch_path_both_combine_implementations(combine, native, monkeypatch):
    """On CPU the torch path combines the K outputs in C (csrc/moe_cpu.c) where it builds,
    else with PyTorch ops: both give the reference's forward and gradients, zero weights included."""
    if native and (DEVICE.type != "cpu" or not native_ready(moe_native.LIBRARY)):
        pytest.skip("the C combination serves CPU tensors and needs a working C compiler")
    if not native:
        monkeypatch.setenv(DISABLE_ENV, "native")
    x, weights, indices, experts = _routing_case("dder_like")
    check_moe("torch", torch.float32, x, weights, indices, experts, combine)
    # A softmax that underflowed: weight 0, log w = -inf on the logsumexp path. The float64
    # reference's own gradient there is nan (log's 1/w times 0), so it gets 1e-300 instead: the same
    # function and derivative to far below float32 resolution.
    weights = weights.clone()
    weights[:5, 1] = 0.0
    got_in = [t.float().requires_grad_() for t in (x, weights)]
    ref_in = [got_in[0].detach().double().requires_grad_(),
              got_in[1].detach().double().clamp_min(1e-300).requires_grad_()]
    experts32 = [t.float() for t in experts]
    got = moe_mlp(got_in[0], got_in[1], indices, *experts32, combine=combine, backend="torch")
    ref = moe_mlp_ref(ref_in[0], ref_in[1], indices, *(t.double() for t in experts32), combine=combine)
    assert_close_rel(got, ref, "moe_mlp", torch.float32, "y")
    dy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for name, gg, rg in zip(("x", "weights"), torch.autograd.grad(got, got_in, dy.float()),
                            torch.autograd.grad(ref, ref_in, dy)):
        assert_close_rel(gg, rg, "moe_mlp", torch.float32, f"grad of {name}")


def test_moe_mlp_by_hand():
    """One pixel, two experts, C=1, Hd=1: y = 0.25*E0 + 0.75*E1 with E = gelu(a*x + b)*c + d."""
    gelu = lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2)))
    x = torch.tensor([[2.0]])
    w1, b1 = torch.tensor([[[0.5]], [[-1.0]]]), torch.tensor([[0.1], [0.3]])
    w2, b2 = torch.tensor([[[2.0]], [[-0.5]]]), torch.tensor([[1.0], [0.0]])
    e0 = gelu(0.5 * 2 + 0.1) * 2 + 1
    e1 = gelu(-1.0 * 2 + 0.3) * -0.5
    weights, indices = torch.tensor([[0.25, 0.75]]), torch.tensor([[0, 1]])
    y = moe_mlp(x, weights, indices, w1, b1, w2, b2, backend="torch")
    assert y.item() == pytest.approx(0.25 * e0 + 0.75 * e1, rel=1e-6)
    y = moe_mlp(x, weights, indices, w1, b1, w2, b2, combine="logsumexp", backend="torch")
    assert y.item() == pytest.approx(math.log(0.25 * math.exp(e0) + 0.75 * math.exp(e1)), rel=1e-6)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(P=st.integers(1, 90), C=st.integers(1, 40), Hd=st.integers(1, 70), N=st.integers(1, 8),
       data=st.data())
def test_moe_mlp_random_shapes(P, C, Hd, N, data):
    K = data.draw(st.integers(1, N), label="K")
    combine = data.draw(st.sampled_from(["sum", "logsumexp"]), label="combine")
    bias = data.draw(st.booleans(), label="bias")
    backend = data.draw(st.sampled_from(BACKENDS), label="backend")
    g = torch.Generator().manual_seed(P * 1000 + C)
    x = torch.randn(P, C, generator=g, dtype=torch.float64)
    weights, indices = route(torch.randn(P, N, generator=g, dtype=torch.float64), K)
    check_moe(backend, torch.float32, x, weights, indices, make_experts(N, C, Hd, bias=bias), combine)


# ---------------------------------------------------------------------------------------------
# Expert forms: activations, gated experts, nn.Linear layout
# ---------------------------------------------------------------------------------------------
FORMS = [("silu", "stacked", True), ("relu", "linear", True), ("swiglu", "linear", False),
         ("geglu", "stacked", True), ("swiglu", "stacked", True), ("gelu", "linear", False)]
# The interpreter is slow: Triton takes the forms that cover plain and gated, both layouts, with
# and without biases.
TRITON_FORMS = [("relu", "linear", True), ("swiglu", "linear", False), ("geglu", "stacked", True)]


@pytest.mark.parametrize("backend,activation,layout,bias",
                         [("torch", *f) for f in FORMS] + [("triton", *f) for f in TRITON_FORMS])
def test_moe_mlp_expert_forms_float32(activation, layout, bias, backend):
    """Every activation and gated form, both weight layouts, biases or none; Hd = 19 also takes the
    CPU path's hidden padding (each half of a gated w1 padded on its own)."""
    g = torch.Generator().manual_seed(len(activation) + len(layout))
    P, C, Hd, N, K = 57, 16, 19, 4, 2
    x = torch.randn(P, C, generator=g, dtype=torch.float64)
    weights, indices = route(torch.randn(P, N, generator=g, dtype=torch.float64), K)
    experts = make_experts(N, C, Hd, bias=bias, gated=activation in ("swiglu", "geglu"), layout=layout)
    check_moe(backend, torch.float32, x, weights, indices, experts, "sum", activation=activation, layout=layout)


@pytest.mark.parametrize("backend,activation,layout", [("torch", "swiglu", "linear"), ("torch", "relu", "stacked"),
                                                       ("triton", "swiglu", "linear")])
def test_moe_mlp_expert_forms_float16_and_float64(activation, layout, backend):
    x, weights, indices, _ = _routing_case("dder_like")
    experts = make_experts(6, 48, 40, gated=activation == "swiglu", layout=layout)
    check_moe(backend, torch.float16, x, weights, indices, experts, "logsumexp", activation=activation, layout=layout)
    if backend == "torch":
        check_moe(backend, torch.float64, x, weights, indices, experts, "sum", activation=activation, layout=layout)


def test_swiglu_by_hand():
    """One row, one expert, nn.Linear layout: y = w * down(SiLU(gate x) * (up x)), written out."""
    g = torch.Generator().manual_seed(5)
    gate, up, down = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((3, 4), (3, 4), (4, 3)))
    x = torch.randn(1, 4, generator=g, dtype=torch.float64)
    want = 0.25 * (down @ (F.silu(gate @ x[0]) * (up @ x[0])))
    got = moe_mlp(x, torch.tensor([[0.25]], dtype=torch.float64), torch.tensor([[0]]), torch.cat([gate, up])[None],
                  None, down[None], None, activation="swiglu", layout="linear")
    assert torch.allclose(got[0], want, rtol=1e-12, atol=1e-12)


# Bad input
# ---------------------------------------------------------------------------------------------
def _valid_args():
    P, C, Hd, N, K = 10, 16, 20, 4, 2
    x = torch.randn(P, C, device=DEVICE)
    weights, indices = topk_softmax_ref(torch.randn(P, N, device=DEVICE), K)
    w1, b1, w2, b2 = (t.float().to(DEVICE) for t in make_experts(N, C, Hd))
    return dict(x=x, weights=weights, indices=indices, w1=w1, b1=b1, w2=w2, b2=b2)


@pytest.mark.parametrize("name,bad,match", [
    ("x", lambda a: a["x"].long(), "x"),
    ("x", lambda a: a["x"][:, :8], "w1"),
    ("weights", lambda a: a["weights"][:, :1], "weights"),
    ("indices", lambda a: a["indices"][:5], "indices"),
    ("indices", lambda a: a["indices"].float(), "indices"),
    ("indices", lambda a: a["indices"].index_fill(0, torch.tensor([3], device=DEVICE), 4), "indices"),
    ("indices", lambda a: a["indices"].index_fill(0, torch.tensor([3], device=DEVICE), -1), "indices"),
    ("w2", lambda a: a["w2"].transpose(1, 2), "w2"),
    ("b1", lambda a: a["b1"][:, :-1], "b1"),
    ("b2", lambda a: a["b2"].double(), "b2"),
    ("w1", lambda a: a["w1"].to("meta"), "w1"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_mlp_rejects_bad_input(name, bad, match, backend):
    args = _valid_args()
    args[name] = bad(args)
    with pytest.raises(ValueError, match=rf"\b{match}\b"):
        moe_mlp(**args, backend=backend)


def test_moe_mlp_rejects_unknown_forms_and_mismatched_experts():
    args = _valid_args()
    for kw, match in [(dict(activation="tanh"), "activation must be one of .*swiglu"),
                      (dict(layout="fused"), "layout must be one of .*linear"),
                      (dict(activation="swiglu"), r"w2 must have shape \(4, 10, 16\)"),
                      (dict(layout="linear"), r"w1 must have shape \(N, Hd, C\) with C=16")]:
        with pytest.raises(ValueError, match=match):
            moe_mlp(**args, backend="torch", **kw)
    args["w2"] = args["w2"][:3]
    with pytest.raises(ValueError, match=r"w2 must have shape \(4, 20, 16\)"):
        moe_mlp(**args, backend="torch")


def test_topk_softmax_rejects_unknown_routing():
    with pytest.raises(ValueError, match="routing must be one of .*softmax_topk"):
        topk_softmax(torch.randn(5, 4), 2, routing="sinkhorn")
    with pytest.raises(ValueError, match="renormalize=False applies to routing='softmax_topk'"):
        topk_softmax(torch.randn(5, 4), 2, renormalize=False)


def test_moe_mlp_rejects_unknown_combine_and_backend():
    with pytest.raises(ValueError, match="combine"):
        moe_mlp(**_valid_args(), combine="max", backend="torch")
    with pytest.raises(ValueError, match="backend"):
        moe_mlp(**_valid_args(), backend="cuda")


@pytest.mark.parametrize("logits,k,match", [
    (torch.randn(5, 4), 0, r"\bk\b"),
    (torch.randn(5, 4), 5, r"\bk\b"),
    (torch.randint(0, 3, (5, 4)), 2, "logits"),
    (torch.randn(5, 4, 2), 2, "logits"),
])
def test_topk_softmax_rejects_bad_input(logits, k, match):
    with pytest.raises(ValueError, match=match):
        topk_softmax(logits, k, backend="torch")


# ---------------------------------------------------------------------------------------------
# torch.library registration: opcheck, torch.compile, torch.export
# ---------------------------------------------------------------------------------------------
class TinyDDER(torch.nn.Module):
    """Router + sparse experts, the way DDER uses the two ops."""

    def __init__(self, C=16, Hd=21, N=4, K=2, combine="sum"):
        super().__init__()
        w1, b1, w2, b2 = (torch.nn.Parameter(t.float()) for t in make_experts(N, C, Hd))
        self.w1, self.b1, self.w2, self.b2 = w1, b1, w2, b2
        self.router = torch.nn.Linear(C, N)
        self.K, self.combine = K, combine

    def forward(self, x):
        weights, indices = topk_softmax(self.router(x), self.K, backend="torch")
        return x + moe_mlp(x, weights, indices, self.w1, self.b1, self.w2, self.b2,
                           combine=self.combine, backend="torch")


@pytest.mark.parametrize("P,K,N,block", [(1, 1, 1, 16), (203, 2, 6, 16), (5000, 2, 6, 16), (777, 3, 8, 64),
                                         (300, 4, 4, 4096)])
def test_triton_dispatch_plan_is_the_stable_sort(P, K, N, block):
    """The Triton path's counting sort (count per tile, scan, scatter) gives exactly the plan of
    torch.sort(stable=True): the same order and segment offsets. 5000 x 2 assignments in tiles of
    16 make 625 tiles, so the scan runs over several chunks of tiles; expert N-1 is never picked."""
    g = torch.Generator().manual_seed(P + K + N)
    indices = torch.randint(0, max(1, N - 1), (P, K), generator=g).to(DEVICE)
    order, offsets = moe_triton.dispatch_plan(indices, N, block=block)
    ref_order, ref_offsets = moe_torch.sort_assignments(indices, N)
    assert torch.equal(offsets, ref_offsets)
    assert torch.equal(order, ref_order)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_bad_index_spoils_only_its_row(backend):
    """check_indices=False (the model's path, no host sync): an index outside [0, N) is neither
    read nor written out of bounds, and every other row is still right."""
    x, weights, indices, experts = _routing_case("dder_like")
    indices = indices.clone()
    indices[0, 1], indices[5, 0] = 6, -1
    experts32 = [t.float().to(DEVICE) for t in experts]
    y = moe_mlp(x.float().to(DEVICE), weights.float().to(DEVICE), indices.to(DEVICE), *experts32,
                backend=backend, check_indices=False)
    good = torch.ones(x.shape[0], dtype=torch.bool)
    good[[0, 5]] = False
    ref = moe_mlp_ref(x[good], weights[good], indices[good], *experts)
    assert_close_rel(y[good.to(DEVICE)].cpu(), ref, "moe_mlp", torch.float32, "rows with valid indices")


def test_custom_ops_pass_opcheck():
    """Schema, fake (shapes and strides) and autograd registration of all four ops."""
    ops = torch.ops.m2restore_kernels
    args = _valid_args()
    x, weights, indices, w1, b1, w2, b2 = (args[n] for n in ("x", "weights", "indices", "w1", "b1", "w2", "b2"))
    x, weights = x.requires_grad_(), weights.requires_grad_()
    # float32 throughout, and float32 inputs with bfloat16 GEMMs (what autocast asks for); and gated
    # experts in nn.Linear's layout (transposed views: the fakes must give the real strides).
    gated = [t.float().to(DEVICE) for t in make_experts(4, 16, 10, gated=True, layout="linear")]
    forms = [("gelu", w1, b1, w2, dtype) for dtype in (torch.float32, torch.bfloat16)]
    forms.append(("swiglu", gated[0].transpose(1, 2), gated[1], gated[2].transpose(1, 2), torch.float32))
    # save_hidden: the forward keeps the first projection for the backward, or leaves it to recompute.
    for (activation, w1_, b1_, w2_, dtype), save in itertools.product(forms, (True, False)):
        torch.library.opcheck(ops.moe_mlp.default, (x, weights, indices, w1_, b1_, w2_, b2, "logsumexp", activation,
                                                    "torch", True, dtype, save))
    # The backward ops have no autograd of their own (no double backward): inputs without grad.
    x, weights = x.detach(), weights.detach()
    for (activation, w1_, b1_, w2_, dtype), save in itertools.product(forms, (True, False)):
        y, out, order, offsets, hpre = ops.moe_mlp(x, weights, indices, w1_, b1_, w2_, b2, "logsumexp", activation,
                                                   "torch", True, dtype, save)
        torch.library.opcheck(ops.moe_mlp_bwd.default, (torch.randn_like(y), x, weights, order, offsets, w1_, b1_,
                                                        w2_, out, hpre, "logsumexp", activation, "torch"))
    logits = torch.randn(9, 5, requires_grad=True)
    torch.library.opcheck(ops.topk_softmax.default, (logits, 2, "torch"))
    w, i = topk_softmax(logits.detach(), 2, backend="torch")
    torch.library.opcheck(ops.topk_softmax_bwd.default, (torch.randn_like(w), w, i, 5, "torch"))


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_kept_first_projection_is_saved_only_for_a_backward(activation, monkeypatch):
    """The PyTorch path keeps x @ w1 + b1 (K*P rows, Hd padded to 16) for the backward only when a
    gradient will be taken, and the backward from it equals the recomputing one and the float64
    reference's, in row chunks of 7 (several per expert)."""
    monkeypatch.setattr(moe_torch, "ROW_CHUNK_BYTES", 1)
    monkeypatch.setattr(moe_torch, "MIN_ROW_CHUNK", 7)
    x, weights, indices, _ = _routing_case("dder_like")
    w1, b1, w2, b2 = make_experts(6, x.shape[1], 13, gated=activation == "swiglu")
    seen = []
    fwd = moe_torch.moe_mlp_fwd
    monkeypatch.setattr(moe_torch, "moe_mlp_fwd", lambda *a, **kw: seen.append(kw["save_hidden"]) or fwd(*a, **kw))
    args = (x, weights, indices, w1, b1, w2, b2)
    with torch.no_grad():
        moe_mlp(*args, backend="torch", activation=activation)
    moe_mlp(*args, backend="torch", activation=activation)
    moe_mlp(*(t.requires_grad_() if t is w2 else t for t in args), backend="torch", activation=activation)
    assert seen == [False, False, True]
    ops = torch.ops.m2restore_kernels
    op_args = (x, weights, indices, w1, b1, w2, b2, "logsumexp", activation, "torch", True, torch.float64)
    y, out, order, offsets, hpre = ops.moe_mlp(*op_args, True)
    assert hpre.shape == (indices.numel(), (2 if activation == "swiglu" else 1) * 16)
    assert ops.moe_mlp(*op_args, False)[4].numel() == 0
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    bwd = (dy, x, weights, order, offsets, w1, b1, w2, out)
    kept = ops.moe_mlp_bwd(*bwd, hpre, "logsumexp", activation, "torch")
    recomputed = ops.moe_mlp_bwd(*bwd, hpre[:0], "logsumexp", activation, "torch")
    for a, b in zip(kept, recomputed):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # Last: the reference's .double() is the float64 inputs themselves, which it marks requiring grad.
    check_moe("torch", torch.float64, x, weights, indices, (w1, b1, w2, b2), "logsumexp", activation=activation)


def test_large_cpu_buffers_advised_onto_huge_pages_are_ordinary_tensors():
    """native_impl.empty advises buffers of 4 MiB or more (on Linux) before their first touch; the
    advice must leave an ordinary writable tensor whose every element holds what was written."""
    t = moe_native.empty(1 << 20, 6, dtype=torch.float32, device=torch.device("cpu"))  # 24 MiB
    assert t.shape == (1 << 20, 6) and t.dtype == torch.float32 and t.is_contiguous()
    values = torch.arange(t.numel(), dtype=torch.float32).view_as(t)  # exact below 2**24
    assert torch.equal(t.copy_(values), values)


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = TinyDDER(combine="logsumexp")
    x = torch.randn(77, 16)
    compiled = torch.compile(model, fullgraph=True)
    x_eager, x_comp = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_eager, y_comp = model(x_eager), compiled(x_comp)
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-6, atol=1e-6)
    g_eager = torch.autograd.grad(y_eager.square().sum(), [x_eager, *model.parameters()])
    g_comp = torch.autograd.grad(y_comp.square().sum(), [x_comp, *model.parameters()])
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_torch_export_keeps_the_ops():
    model = TinyDDER()
    exported = torch.export.export(model, (torch.randn(30, 16),))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "m2restore_kernels.topk_softmax.default" in targets
    assert "m2restore_kernels.moe_mlp.default" in targets
    x = torch.randn(30, 16)
    torch.testing.assert_close(exported.module()(x), model(x))


def test_moe_mlp_cpu_autocast_bf16():
    """bf16 GEMMs under CPU autocast (the fast CPU mode): output bf16, float32 gradients, both
    within the bf16 tolerance of the float64 reference."""
    g = torch.Generator().manual_seed(9)
    P, C, Hd, N, K = 300, 48, 127, 6, 2
    weights, indices = route(torch.randn(P, N, generator=g, dtype=torch.float64), K)
    inputs = [torch.randn(P, C, generator=g, dtype=torch.float64), *make_experts(N, C, Hd)]
    ref_in = [t.clone().requires_grad_() for t in inputs]
    got_in = [t.float().requires_grad_() for t in inputs]
    ref = moe_mlp_ref(ref_in[0], weights, indices, *ref_in[1:], combine="logsumexp")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = moe_mlp(got_in[0], weights.float(), indices, *got_in[1:], combine="logsumexp", backend="torch")
    assert got.dtype == torch.bfloat16
    assert_close_rel(got, ref, "moe_mlp", torch.bfloat16, "y")
    dy = torch.randn(ref.shape, generator=g).to(got.dtype)  # the same upstream gradient for both sides
    for gg, rg in zip(torch.autograd.grad(got, got_in, dy), torch.autograd.grad(ref, ref_in, dy.double())):
        assert gg.dtype == torch.float32  # the parameters' dtype; computed in bfloat16
        assert_close_rel(gg, rg, "moe_mlp", torch.bfloat16, "gradient")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16])
def test_moe_mlp_autocast_is_casting_first(backend, x_dtype):
    """Under autocast the op takes float32 parameters (and float32 or already-half activations) and
    casts them as it loads them: the output must be exactly that of the op called on inputs cast
    beforehand, and every gradient must come in its input's dtype, within the float16 tolerance of
    the float64 reference. float16, which the Triton interpreter computes correctly (bf16 it does not)."""
    g = torch.Generator().manual_seed(12)
    P, C, Hd, N, K = 300, 48, 127, 6, 2
    weights, indices = route(torch.randn(P, N, generator=g, dtype=torch.float64), K)
    x64, experts64 = torch.randn(P, C, generator=g, dtype=torch.float64), make_experts(N, C, Hd)
    x = x64.to(DEVICE, x_dtype).requires_grad_()
    experts = [t.to(DEVICE, torch.float32).requires_grad_() for t in experts64]
    weights, indices = weights.to(DEVICE, torch.float32), indices.to(DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        got = moe_mlp(x, weights, indices, *experts, combine="logsumexp", backend=backend)
    cast_first = moe_mlp(x.detach().half(), weights, indices, *(t.detach().half() for t in experts),
                         combine="logsumexp", backend=backend)
    assert got.dtype == torch.float16 and torch.equal(got, cast_first)
    ref_in = [x64.requires_grad_(), *(t.requires_grad_() for t in experts64)]
    ref = moe_mlp_ref(ref_in[0], weights.double().cpu(), indices.cpu(), *ref_in[1:], combine="logsumexp")
    dy = torch.randn(ref.shape, generator=g).half()
    grads = torch.autograd.grad(got, [x, *experts], dy.to(DEVICE))
    for name, gg, rg, t in zip(["x", "w1", "b1", "w2", "b2"], grads, torch.autograd.grad(ref, ref_in, dy.double()),
                               [x, *experts]):
        assert gg.dtype == t.dtype, name
        assert_close_rel(gg.cpu(), rg, "moe_mlp", torch.float16, f"grad of {name}")


def test_moe_mlp_mixed_dtypes_need_autocast():
    x, weights, indices, w1, b1, w2, b2 = (_valid_args()[n] for n in ("x", "weights", "indices", "w1", "b1", "w2", "b2"))
    with pytest.raises(ValueError, match="w1 has dtype"):
        moe_mlp(x.half(), weights, indices, w1, b1, w2, b2, backend="torch")


# ---------------------------------------------------------------------------------------------
# CUDA only
# ---------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("combine", ["sum", "logsumexp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_moe_mlp_triton_cuda(dtype, combine):
    g = torch.Generator().manual_seed(7)
    P, C, Hd, N, K = 3000, 192, 510, 6, 2
    x = torch.randn(P, C, generator=g, dtype=torch.float64)
    weights, indices = route(torch.randn(P, N, generator=g, dtype=torch.float64), K)
    experts = make_experts(N, C, Hd)
    moved = [t.cuda() for t in (x, weights, indices, *experts)]
    check_moe("triton", dtype, moved[0], moved[1], moved[2], moved[3:], combine)


@pytest.mark.cuda
def test_moe_mlp_cuda_autocast_bf16():
    g = torch.Generator().manual_seed(8)
    P, C, Hd, N, K = 2000, 96, 255, 6, 2
    x = torch.randn(P, C, generator=g, dtype=torch.float64)
    weights, indices = route(torch.randn(P, N, generator=g, dtype=torch.float64), K)
    experts = make_experts(N, C, Hd)
    ref = moe_mlp_ref(x, weights, indices, *experts)
    x, weights, indices = x.float().cuda(), weights.float().cuda(), indices.cuda()
    w1, b1, w2, b2 = (t.float().cuda() for t in experts)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = moe_mlp(x, weights, indices, w1, b1, w2, b2)
    assert y.dtype == torch.bfloat16
    assert_close_rel(y.cpu(), ref, "moe_mlp", torch.bfloat16, "y")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("combine", ["sum", "logsumexp"])
def test_no_pixels(backend, combine):
    """An empty batch (P = 0) routes and combines nothing, forward and backward."""
    x = torch.randn(0, 16, device=DEVICE, requires_grad=True)
    w1, b1, w2, b2 = (t.float().to(DEVICE) for t in make_experts(4, 16, 20))
    weights, indices = topk_softmax(torch.randn(0, 4, device=DEVICE), 2, backend=backend)
    y = moe_mlp(x, weights, indices, w1, b1, w2, b2, combine=combine, backend=backend)
    assert y.shape == (0, 16)
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert grad.shape == (0, 16)


@pytest.mark.cuda
@pytest.mark.parametrize("C,Hd", [(48, 127), (96, 255), (192, 510)])
def test_moe_mlp_triton_cuda_default_float32_dots(C, Hd, monkeypatch):
    """The package's default float32 dots (3xTF32, fewer pipeline stages for float32 tiles) at the
    three DDER widths: float32 accuracy, forward and every gradient."""
    monkeypatch.delenv("M2RESTORE_FP32_DOT")
    g = torch.Generator().manual_seed(C)
    P, N, K = 2000, 6, 2
    x = torch.randn(P, C, generator=g, dtype=torch.float64)
    weights, indices = route(torch.randn(P, N, generator=g, dtype=torch.float64), K)
    check_moe("triton", torch.float32, x, weights, indices, make_experts(N, C, Hd), "logsumexp")
