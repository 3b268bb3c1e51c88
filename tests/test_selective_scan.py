"""selective_scan (and the mixer's causal conv) against float64 references, forward and every gradient.

The reference here is selective_scan_ref run in float64 on the same (rounded) inputs; the mixer test
has its own step-by-step forward of mamba_ssm's Mamba. On a CPU the Triton path runs in Triton's
interpreter (root conftest sets TRITON_INTERPRET=1), slowly, so it gets the smaller cases.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from m2restore_kernels import causal_conv1d, causal_conv1d_ref, selective_scan, selective_scan_ref
from m2restore_kernels._backend import native_ready, optional_op
from m2restore_kernels.testing import assert_close_rel

ss = importlib.import_module("m2restore_kernels.selective_scan")  # the package re-exports a function of that name
ss_native = importlib.import_module("m2restore_kernels.selective_scan.native_impl")
ss_torch = importlib.import_module("m2restore_kernels.selective_scan.torch_impl")
ss_triton = importlib.import_module("m2restore_kernels.selective_scan.triton_impl")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
# delta regimes (raw delta before bias/softplus) x |A| range:
#   mamba: softplus(delta + bias) ~ 0.01..0.2, |A| in [0.5, 16] (a trained-block scale)
#   memory: tiny steps, the state remembers the whole sequence (chunk carries span everything)
#   forget: |A| delta' up to ~60 per step, beyond the chunked path's float32 bound: log-space scan
REGIMES = {"mamba": (-3.0, 0.5, 16.0), "memory": (-8.0, 0.3, 2.0), "forget": (3.0, 0.5, 16.0)}


def make_inputs(b, d, l, n, *, groups=None, dtype=torch.float32, D=True, z=True, bias=True, regime="mamba", seed=0):
    """The eight arguments of selective_scan (None where switched off) as leaf tensors."""
    gen = torch.Generator().manual_seed(seed)
    shift, spread, a_max = REGIMES[regime]

    def randn(*shape, scale=1.0, offset=0.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + offset

    bc_shape = (b, n, l) if groups is None else (b, groups, n, l)
    A = -(0.5 + torch.rand(d, n, generator=gen, dtype=torch.float64) * (a_max - 0.5))
    tensors = [randn(b, d, l), randn(b, d, l, scale=spread, offset=shift if not bias else 0.0), A,
               randn(*bc_shape), randn(*bc_shape), randn(d) if D else None, randn(b, d, l) if z else None,
               randn(d, scale=0.2, offset=shift) if bias else None]
    return [None if t is None else t.to(DEVICE, dtype).requires_grad_() for t in tensors]


def positive_steps(args):
    """Without softplus, delta + delta_bias is used as is: make it small and positive, as a model would."""
    args = list(args)
    for i in (1, 7):
        if args[i] is not None:
            args[i] = (args[i].detach().abs() * 0.02).requires_grad_()
    return args



def check_against_float64(args, backend, *, softplus=True, last_state=True):
    """Forward, last state and the gradient of every given input, each against the float64 reference."""
    dtype = args[0].dtype
    ref_args = [None if t is None else t.detach().double().requires_grad_() for t in args]
    out, last = selective_scan(*args, delta_softplus=softplus, return_last_state=True, backend=backend)
    ref, ref_last = selective_scan_ref(*ref_args, delta_softplus=softplus, return_last_state=True)
    assert out.dtype == args[0].dtype and out.shape == ref.shape
    assert last.shape == ref_last.shape
    assert_close_rel(out, ref, "selective_scan", dtype, "out")
    assert_close_rel(last, ref_last, "selective_scan", dtype, "last state")

    gen = torch.Generator().manual_seed(1)
    g_out = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    g_last = torch.randn(ref_last.shape, generator=gen, dtype=torch.float64).to(DEVICE) if last_state else None
    loss = (out.double() * g_out).sum() + ((last.double() * g_last).sum() if last_state else 0.0)
    ref_loss = (ref * g_out).sum() + ((ref_last * g_last).sum() if last_state else 0.0)
    given = [(name, t, r) for name, t, r in zip(NAMES, args, ref_args) if t is not None]
    grads = torch.autograd.grad(loss, [t for _, t, _ in given])
    ref_grads = torch.autograd.grad(ref_loss, [r for _, _, r in given])
    for (name, t, _), g, rg in zip(given, grads, ref_grads):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        if rg.norm() == 0:  # e.g. dA at l = 1: x_{-1} = 0, so the decay never matters
            assert g.abs().max() <= 1e-6, name
        else:
            assert_close_rel(g, rg, "selective_scan", dtype, f"grad of {name}")


# --------------------------------------------------------------------------------------------
# The reference itself
# --------------------------------------------------------------------------------------------
def test_reference_matches_hand_computation():
    """One channel, one state, three steps, written out: x_t = e^{dt a} x_{t-1} + dt b_t u_t."""
    u = torch.tensor([[[1.0, 2.0, -1.0]]], dtype=torch.float64)
    dt = torch.tensor([[[0.5, 0.1, 1.0]]], dtype=torch.float64)
    a, Dv, zv = -2.0, 0.3, torch.tensor([[[0.2, -1.0, 3.0]]], dtype=torch.float64)
    B = torch.tensor([[[1.0, -1.0, 0.5]]], dtype=torch.float64)
    C = torch.tensor([[[2.0, 1.0, -1.0]]], dtype=torch.float64)
    x, ys = 0.0, []
    for t in range(3):
        x = math.exp(dt[0, 0, t] * a) * x + dt[0, 0, t] * B[0, 0, t] * u[0, 0, t]
        y = (C[0, 0, t] * x + Dv * u[0, 0, t]) * zv[0, 0, t] / (1 + math.exp(-zv[0, 0, t]))
        ys.append(float(y))
    out, last = selective_scan_ref(u, dt, torch.tensor([[a]], dtype=torch.float64), B, C,
                                   torch.tensor([Dv], dtype=torch.float64), zv, return_last_state=True)
    torch.testing.assert_close(out[0, 0], torch.tensor(ys, dtype=torch.float64))
    assert float(last[0, 0, 0]) == pytest.approx(float(x))


def test_reference_grouped_b_c_reads_channel_group():
    """(b, g, n, l) B/C: channel c uses group c // (d / g), same as a per-channel copy of the group."""
    u, delta, A, B, C, *_ = make_inputs(1, 4, 5, 3, groups=2, dtype=torch.float64, D=False, z=False, bias=False)
    out = selective_scan_ref(u, delta, A, B, C, delta_softplus=True)
    for c in range(4):
        g = c // 2
        single = selective_scan_ref(u[:, c:c + 1], delta[:, c:c + 1], A[c:c + 1], B[:, g], C[:, g],
                                    delta_softplus=True)
        torch.testing.assert_close(out[:, c:c + 1], single)


# --------------------------------------------------------------------------------------------
# backend="torch": the C loop (CPU tensors) and the chunked PyTorch scan, the full grid for each
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("l", [1, 7, 64, 300])
@pytest.mark.parametrize("n", [1, 4, 16])
def test_torch_all_options(l, n, scan_torch_impl):
    check_against_float64(make_inputs(2, 6, l, n), "torch")


@pytest.mark.parametrize("regime", ["memory", "forget"])
@pytest.mark.parametrize("l", [64, 300])
def test_torch_decay_regimes(regime, l, scan_torch_impl):
    """Long memory (carries across all chunks) and near-total forgetting (chunks of one step)."""
    check_against_float64(make_inputs(2, 4, l, 16, regime=regime), "torch")


@pytest.mark.parametrize("D,z,bias,softplus", [
    (False, False, False, False), (True, False, False, True), (False, True, False, True),
    (False, False, True, True), (True, True, True, False), (False, True, True, False)])
def test_torch_option_subsets(D, z, bias, softplus, scan_torch_impl):
    args = make_inputs(2, 4, 64, 4, D=D, z=z, bias=bias, regime="mamba" if softplus or bias else "memory")
    check_against_float64(positive_steps(args) if not softplus else args, "torch", softplus=softplus)


@pytest.mark.parametrize("groups,l", [(2, 64), (3, 300), (6, 7)])
def test_torch_grouped(groups, l, scan_torch_impl):
    check_against_float64(make_inputs(2, 6, l, 4, groups=groups), "torch")


def test_torch_without_last_state_grad_and_float16(scan_torch_impl):
    check_against_float64(make_inputs(2, 4, 300, 16, dtype=torch.float16), "torch", last_state=False)


@pytest.mark.parametrize("cfg", [
    ss_torch.ChunkedScanConfig(max_chunk=4, block_elements=1),   # many chunks, three levels, one channel per block
    ss_torch.ChunkedScanConfig(max_log_range=0.0),               # every step alone: the log-space scan
    ss_torch.ChunkedScanConfig(max_log_range_f64=0.0),           # chunks in float32, carries in log space
], ids=["tiny-chunks", "log-space", "log-space-carries"])
def test_torch_chunking_configs(cfg):
    """Every way the chunked path can split the work gives the reference's answer."""
    args = make_inputs(2, 6, 100, 4)
    out, last = ss_torch.selective_scan_fwd(*[a.detach() for a in args], True, cfg)
    ref, ref_last = selective_scan_ref(*[a.detach().double() for a in args], True, return_last_state=True)
    assert_close_rel(out, ref, "selective_scan", torch.float32, "out")
    assert_close_rel(last, ref_last, "selective_scan", torch.float32, "last state")


# --------------------------------------------------------------------------------------------
# Triton path (interpreter on CPU): fewer, smaller cases
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("l,n", [(1, 1), (7, 16), (64, 4)])
def test_triton_all_options(l, n):
    check_against_float64(make_inputs(1, 4, l, n), "triton")


@pytest.mark.parametrize("reverse_scan", ["native", "flip"])
def test_triton_long_sequence_crosses_checkpoints(reverse_scan, monkeypatch):
    """l = 150 spans three checkpoint chunks of 64 (first, inner, a masked last one of 22): the backward
    recomputes each one; with either way of running its reverse-time scan."""
    monkeypatch.setattr(ss_triton, "REVERSE_SCAN", reverse_scan)
    check_against_float64(make_inputs(1, 2, 150, 16), "triton")


@pytest.mark.parametrize("D,z,bias,softplus", [(False, False, False, False), (True, True, False, True)])
def test_triton_option_subsets(D, z, bias, softplus):
    args = make_inputs(1, 4, 7, 4, D=D, z=z, bias=bias)
    check_against_float64(positive_steps(args) if not softplus else args, "triton", softplus=softplus,
                          last_state=False)


def test_triton_grouped_and_float16():
    check_against_float64(make_inputs(2, 6, 7, 4, groups=3), "triton")
    check_against_float64(make_inputs(1, 4, 64, 16, dtype=torch.float16), "triton")


@pytest.mark.parametrize("impl", ["triton", "native"])
def test_custom_op_registration(impl):
    """Fake (meta) kernels, autograd registration and schema agree with the real op (both fused paths)."""
    if impl == "native" and (DEVICE.type != "cpu" or not native_ready(ss_native.LIBRARY)):
        pytest.skip("the C scan needs CPU tensors and a working C compiler")
    args = [None if t is None else t.detach() for t in make_inputs(1, 2, 70, 2)]
    torch.library.opcheck(ss._selective_scan_op, (*args, True, impl), test_utils=("test_schema", "test_faketensor"))


def test_triton_compiles_without_graph_break():
    args = make_inputs(1, 2, 5, 2)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(*a):
        return selective_scan(*a, delta_softplus=True, backend="triton")

    out = f(*args)
    ref = selective_scan_ref(*[t.detach().double() for t in args], delta_softplus=True)
    assert_close_rel(out, ref, "selective_scan", torch.float32)
    out.sum().backward()
    assert all(t.grad is not None for t in args)


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bad,match", [
    ("delta_len", "delta"), ("B_len", "B"), ("C_state", "C"), ("A_dim", "A"), ("A_states", "B"),
    ("D", "D"), ("z", "z"), ("groups", "B"), ("u_rank", "u")])
def test_bad_input_raises(bad, match, backend):
    u, delta, A, B, C, D, z, bias = [t.detach() for t in make_inputs(1, 4, 6, 3)]
    if bad == "delta_len":
        delta = delta[..., :5]
    elif bad == "B_len":
        B = B[..., :5]
    elif bad == "C_state":
        C = C[:, :2]
    elif bad == "A_dim":
        A = A[:3]
    elif bad == "A_states":  # A says 4 states, B and C carry 3
        A = torch.cat([A, A[:, :1]], dim=1)
    elif bad == "D":
        D = D[:3]
    elif bad == "z":
        z = z[..., :5]
    elif bad == "groups":  # 3 groups do not divide 4 channels
        B = B.unsqueeze(1).expand(1, 3, 3, 6)
    elif bad == "u_rank":
        u = u[0]
    with pytest.raises(ValueError, match=match):
        selective_scan(u, delta, A, B, C, D, z, bias, True, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_sequence(backend):
    """l = 0: no output steps, the zero initial state as the last state, empty gradients."""
    args = make_inputs(1, 4, 0, 3)
    out, last = selective_scan(*args, delta_softplus=True, return_last_state=True, backend=backend)
    assert out.shape == (1, 4, 0) and last.shape == (1, 4, 3) and not last.any()
    (du,) = torch.autograd.grad(out.sum(), args[0])
    assert du.shape == (1, 4, 0)


def test_bad_backend_raises():
    args = [t.detach() for t in make_inputs(1, 2, 3, 2)]
    with pytest.raises(ValueError, match="backend"):
        selective_scan(*args, backend="cuda")


# --------------------------------------------------------------------------------------------
# Causal depthwise conv
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", [None, "silu"])
def test_causal_conv1d_matches_hand_loop(activation):
    gen = torch.Generator().manual_seed(0)
    x, w, bias = (torch.randn(2, 3, 9, generator=gen), torch.randn(3, 4, generator=gen),
                  torch.randn(3, generator=gen))
    out = causal_conv1d(x, w, bias, activation, backend="torch")
    exp = torch.zeros_like(x)
    for t in range(9):
        for k in range(4):
            src = t - 3 + k
            if src >= 0:
                exp[:, :, t] += w[:, k] * x[:, :, src]
    exp += bias[:, None]
    if activation:
        exp = exp * torch.sigmoid(exp)
    torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d_ref(x, w[:2], bias)


# --------------------------------------------------------------------------------------------
# The MCDB mixer loads mamba_ssm's layout and computes Mamba's forward
# --------------------------------------------------------------------------------------------
def mamba_forward_float64(sd, hidden, d_state, d_conv):
    """mamba_ssm Mamba's slow path, step by step, in float64 from a state dict in its layout."""
    sd = {k: v.double() for k, v in sd.items()}
    x = hidden.double()
    d_inner = sd["D"].shape[0]
    dt_rank = sd["dt_proj.weight"].shape[1]
    xz = x @ sd["in_proj.weight"].t()                                  # (B, L, 2 d_inner)
    xs, z = xz[..., :d_inner], xz[..., d_inner:]
    w = sd["conv1d.weight"][:, 0]                                      # (d_inner, d_conv)
    conv = sd["conv1d.bias"].expand_as(xs).clone()
    for k in range(d_conv):                                            # causal: tap k reads t - (d_conv-1) + k
        shift = d_conv - 1 - k
        conv[:, shift:] += w[:, k] * xs[:, :xs.shape[1] - shift]
    xs = conv * torch.sigmoid(conv)
    x_dbl = xs @ sd["x_proj.weight"].t()
    dt, Bm, Cm = x_dbl[..., :dt_rank], x_dbl[..., dt_rank:dt_rank + d_state], x_dbl[..., dt_rank + d_state:]
    dt = F.softplus(dt @ sd["dt_proj.weight"].t() + sd["dt_proj.bias"])  # (B, L, d_inner)
    A = -torch.exp(sd["A_log"])
    h = x.new_zeros(x.shape[0], d_inner, d_state)
    ys = []
    for t in range(x.shape[1]):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * xs[:, t])[..., None] * Bm[:, t, None, :]
        ys.append((h * Cm[:, t, None, :]).sum(-1) + sd["D"] * xs[:, t])
    y = torch.stack(ys, dim=1) * (z * torch.sigmoid(z))
    return y @ sd["out_proj.weight"].t()


def random_mamba_state_dict(d_model, d_state, d_conv, expand, gen):
    d_inner, dt_rank = expand * d_model, math.ceil(d_model / 16)
    shapes = {"in_proj.weight": (2 * d_inner, d_model), "conv1d.weight": (d_inner, 1, d_conv),
              "conv1d.bias": (d_inner,), "x_proj.weight": (dt_rank + 2 * d_state, d_inner),
              "dt_proj.weight": (d_inner, dt_rank), "dt_proj.bias": (d_inner,), "A_log": (d_inner, d_state),
              "D": (d_inner,), "out_proj.weight": (d_model, d_inner)}
    sd = {k: torch.randn(*s, generator=gen) * (s[-1] ** -0.5 if len(s) > 1 else 0.5) for k, s in shapes.items()}
    sd["A_log"] = torch.log(torch.rand(d_inner, d_state, generator=gen) * 15 + 1)
    sd["dt_proj.bias"] = torch.rand(d_inner, generator=gen) * 3 - 5  # softplus -> ~0.007..0.13
    return sd


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixer_from_mamba_state_dict(backend):
    mcdb = pytest.importorskip("m2restore.modules.mcdb")
    gen = torch.Generator().manual_seed(0)
    d_model, d_state, d_conv, expand = 8, 16, 4, 2
    sd = random_mamba_state_dict(d_model, d_state, d_conv, expand, gen)
    mixer = mcdb.MambaMixer(d_model, d_state=d_state, d_conv=d_conv, expand=expand, backend=backend)
    mixer.load_state_dict(sd, strict=True)
    hidden = torch.randn(2, 21, d_model, generator=gen)
    out = mixer.to(DEVICE)(hidden.to(DEVICE)).cpu()
    ref = mamba_forward_float64(sd, hidden, d_state, d_conv)
    assert_close_rel(out, ref, "selective_scan", torch.float32, "Mamba mixer output")


# --------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("reverse_scan", ["native", "flip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_triton(dtype, reverse_scan, monkeypatch):
    """Both ways of the backward's reverse-time scan (``REVERSE_SCAN``): the package keeps the one
    that passes here, and the faster if both do."""
    monkeypatch.setattr(ss_triton, "REVERSE_SCAN", reverse_scan)
    check_against_float64(make_inputs(2, 64, 300, 16, dtype=dtype), "triton")
    check_against_float64(make_inputs(2, 64, 300, 16, groups=2, dtype=dtype), "triton")


@pytest.mark.cuda
def test_cuda_auto_matches_mamba_ssm_when_installed():
    if optional_op(*ss.MAMBA_SELECTIVE_SCAN_FN) is None:
        pytest.skip("mamba_ssm is not installed")
    check_against_float64(make_inputs(2, 64, 300, 16), "auto")
