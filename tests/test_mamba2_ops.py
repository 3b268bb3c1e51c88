"""Mamba-2's ops with mamba_ssm's signatures (``m2restore_kernels.selective_scan.ssd``) against a
float64 recurrence written here, one step at a time, in Mamba-2's own (head, headdim, state) terms."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from m2restore_kernels import mamba_chunk_scan_combined, mamba_split_conv1d_scan_combined
from m2restore_kernels._backend import DISABLE_ENV
from m2restore_kernels.selective_scan.ssd import layernorm_fn, rmsnorm_fn


@pytest.fixture(autouse=True)
def cpu_user(monkeypatch):
    """The C loop, as a user's CPU process runs it (the Triton scan has its own tests)."""
    monkeypatch.setenv(DISABLE_ENV, "triton")


def ssd_float64(x, dt, A, B, C, D=None, z=None, dt_bias=None, softplus=False, limit=(0.0, math.inf), initial=None):
    """Mamba-2's recurrence step by step in float64 from ``initial`` (b, h, p, n) or zeros:
    -> (out (b, l, h, p), last state (b, h, p, n))."""
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    batch, seqlen, nheads, headdim = x.shape
    group_of_head = torch.arange(nheads) // (nheads // B.shape[2])
    if dt_bias is not None:
        dt = dt + dt_bias.double()
    if softplus:
        dt = torch.where(dt <= 20, torch.log1p(torch.exp(dt)), dt)
    if tuple(limit) != (0.0, math.inf):  # upstream clamps only for a limit of its own
        dt = dt.clamp(min=limit[0], max=limit[1])
    state = x.new_zeros(batch, nheads, headdim, B.shape[-1]) if initial is None else initial.double()
    outs = []
    for t in range(seqlen):
        Bt, Ct = B[:, t, group_of_head], C[:, t, group_of_head]  # (b, h, n)
        decay = torch.exp(dt[:, t] * A.double())[:, :, None, None]
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * Bt[:, :, None, :]
        y = (state * Ct[:, :, None, :]).sum(-1)
        if D is not None:
            y = y + (D.double() if D.dim() == 2 else D.double()[:, None]) * x[:, t]
        if z is not None:
            y = y * F.silu(z[:, t].double())
        outs.append(y)
    return torch.stack(outs, 1), state


def _case(seed=0, batch=2, seqlen=37, nheads=4, headdim=8, ngroups=2, dstate=6, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(x=r(batch, seqlen, nheads, headdim), dt=r(batch, seqlen, nheads) * 0.5,
                A=-torch.rand(nheads, generator=g, dtype=dtype) - 0.2, B=r(batch, seqlen, ngroups, dstate),
                C=r(batch, seqlen, ngroups, dstate), D2=r(nheads, headdim), D1=r(nheads), z=r(batch, seqlen, nheads, headdim),
                dt_bias=r(nheads) * 0.3)


@pytest.mark.parametrize("D_form,gate,softplus,limit,ngroups", [
    (None, False, False, (0.0, math.inf), 1),
    ("per_head", True, True, (0.0, math.inf), 2),
    ("per_channel", False, True, (0.05, 0.8), 4),
    ("per_channel", True, False, (0.0, math.inf), 2),
])
def test_chunk_scan_is_the_recurrence_forward_and_backward(D_form, gate, softplus, limit, ngroups):
    """Output, last state and every gradient against the float64 recurrence; chunk_size changes nothing."""
    c = _case(ngroups=ngroups)
    if not softplus:
        c["dt"] = c["dt"].abs() + 0.05  # a raw dt is a step size: positive
    D = {None: None, "per_head": c["D1"], "per_channel": c["D2"]}[D_form]
    z = c["z"] if gate else None
    inputs = dict(x=c["x"], dt=c["dt"], A=c["A"], B=c["B"], C=c["C"], D=D, z=z, dt_bias=c["dt_bias"])
    ours_in = {k: None if v is None else v.clone().requires_grad_() for k, v in inputs.items()}
    ref_in = {k: None if v is None else v.double().requires_grad_() for k, v in inputs.items()}
    out, last = mamba_chunk_scan_combined(**{k: ours_in[k] for k in ("x", "dt", "A", "B", "C")}, chunk_size=16,
                                          D=ours_in["D"], z=ours_in["z"], dt_bias=ours_in["dt_bias"],
                                          dt_softplus=softplus, dt_limit=limit, return_final_states=True)
    want, want_last = ssd_float64(**ref_in, softplus=softplus, limit=limit)
    assert out.dtype == torch.float32 and out.shape == c["x"].shape and last.shape == (2, 4, 8, 6)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last.double(), want_last, rtol=1e-5, atol=1e-5)
    other = mamba_chunk_scan_combined(c["x"], c["dt"], c["A"], c["B"], c["C"], chunk_size=4, D=D, z=z,
                                      dt_bias=c["dt_bias"], dt_softplus=softplus, dt_limit=limit)
    torch.testing.assert_close(other, out.detach(), rtol=0, atol=0)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    names = [k for k, v in ours_in.items() if v is not None]
    got = torch.autograd.grad((out.double() * w).sum() + last.double().sum(), [ours_in[k] for k in names])
    ref = torch.autograd.grad((want * w).sum() + want_last.sum(), [ref_in[k] for k in names])
    for name, a, b in zip(names, got, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("gate", [False, True])
def test_initial_states_start_the_recurrence_forward_and_backward(gate):
    """A start state (transformers' chunked prefill from its cache): the recurrence from it, before
    the z gate, clamped dt included; the gradient reaches the start state too."""
    c = _case()
    start = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(9))
    names = ["x", "dt", "A", "B", "C", "D1", "dt_bias"] + (["z"] if gate else [])
    ours = {k: c[k].clone().requires_grad_() for k in names}
    ref = {k: c[k].double().requires_grad_() for k in names}
    s_ours, s_ref = start.clone().requires_grad_(), start.double().requires_grad_()
    out, last = mamba_chunk_scan_combined(ours["x"], ours["dt"], ours["A"], ours["B"], ours["C"], chunk_size=8,
                                          D=ours["D1"], z=ours.get("z"), dt_bias=ours["dt_bias"], dt_softplus=True,
                                          dt_limit=(0.1, 1.5), initial_states=s_ours, return_final_states=True)
    want, want_last = ssd_float64(ref["x"], ref["dt"], ref["A"], ref["B"], ref["C"], D=ref["D1"], z=ref.get("z"),
                                  dt_bias=ref["dt_bias"], softplus=True, limit=(0.1, 1.5), initial=s_ref)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last.double(), want_last, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(out.double().sum() + last.double().sum(), [*ours.values(), s_ours])
    exp = torch.autograd.grad(want.sum() + want_last.sum(), [*ref.values(), s_ref])
    for name, a, b in zip(names + ["initial_states"], got, exp):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=lambda m: f"d{name}: {m}")


def test_seq_idx_restarts_the_state_and_gives_each_sequence_its_last_state():
    """Packed sequences (seq_idx runs, cu_seqlens) give what each sequence gives alone."""
    c = _case(batch=1, seqlen=30)
    cu = torch.tensor([0, 7, 8, 21, 30])
    seq_idx = torch.repeat_interleave(torch.arange(4), cu.diff())[None].to(torch.int32)
    args = (c["x"], c["dt"], c["A"], c["B"], c["C"])
    out, last, states = mamba_chunk_scan_combined(*args, chunk_size=8, D=c["D1"], z=c["z"], dt_bias=c["dt_bias"],
                                                  seq_idx=seq_idx, cu_seqlens=cu, dt_softplus=True,
                                                  return_final_states=True, return_varlen_states=True)
    assert states.shape == (4, 4, 8, 6)
    for i, (lo, hi) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        part = [t[:, lo:hi] for t in (c["x"], c["dt"])] + [c["A"]] + [t[:, lo:hi] for t in (c["B"], c["C"])]
        want, want_last = ssd_float64(*part, D=c["D1"], z=c["z"][:, lo:hi], dt_bias=c["dt_bias"], softplus=True)
        torch.testing.assert_close(out[:, lo:hi].double(), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(states[i].double(), want_last[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last[0], states[-1], rtol=0, atol=0)
    # Upstream's padded varlen generation: cu_seqlens stops short of seqlen and ends in an empty
    # sequence, and seq_idx does not restart at every one of its sequences. Each state is still its
    # sequence's from a zero start; the empty one's is zero.
    padded = torch.tensor([0, 7, 21, 21])
    _, states = mamba_chunk_scan_combined(*args, chunk_size=8, dt_softplus=True, cu_seqlens=padded,
                                          seq_idx=torch.zeros(1, 30, dtype=torch.int32), return_varlen_states=True)
    for i, (lo, hi) in enumerate([(0, 7), (7, 21)]):
        part = [t[:, lo:hi] for t in (c["x"], c["dt"])] + [c["A"]] + [t[:, lo:hi] for t in (c["B"], c["C"])]
        torch.testing.assert_close(states[i].double(), ssd_float64(*part, softplus=True)[1][0], rtol=1e-5, atol=1e-5)
    assert states.shape == (3, 4, 8, 6) and not states[2].any()
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to at most seqlen"):
        mamba_chunk_scan_combined(*args, chunk_size=8, cu_seqlens=torch.tensor([0, 9, 4]), return_varlen_states=True)


def test_unsupported_arguments_fail_with_a_line_naming_them():
    c = _case(batch=1, seqlen=5)
    args = (c["x"], c["dt"], c["A"], c["B"], c["C"])
    with pytest.raises(ValueError, match="initial_states with seq_idx is not supported by m2restore_kernels"):
        mamba_chunk_scan_combined(*args, chunk_size=4, initial_states=torch.zeros(1, 4, 8, 6),
                                  seq_idx=torch.zeros(1, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"ngroups \(3\) must divide nheads \(4\)"):
        mamba_chunk_scan_combined(c["x"], c["dt"], c["A"], *(torch.zeros(1, 5, 3, 6),) * 2, chunk_size=4)
    with pytest.raises(ValueError, match="D must be"):
        mamba_chunk_scan_combined(*args, chunk_size=4, D=torch.zeros(3))


@pytest.mark.parametrize("rms,before,group", list(itertools.product((True, False), (True, False), (None, 4))))
def test_gated_norm_is_group_norm_times_the_gate(rms, before, group):
    """layernorm_fn / rmsnorm_fn against F.group_norm (LayerNorm over groups of features) and an
    RMS written out, gated before or after."""
    g = torch.Generator().manual_seed(3)
    x, z = torch.randn(5, 3, 12, generator=g), torch.randn(5, 3, 12, generator=g)
    weight, bias = torch.randn(12, generator=g), torch.randn(12, generator=g)
    h = x.double() if before else x.double() * F.silu(z.double())
    groups = 12 // (group or 12)
    if rms:
        hg = h.unflatten(-1, (groups, -1))
        want = (hg / hg.square().mean(-1, keepdim=True).add(1e-6).sqrt()).flatten(-2) * weight.double() + bias.double()
        got = rmsnorm_fn(x, weight, bias, z=z, eps=1e-6, group_size=group, norm_before_gate=before)
    else:
        want = F.group_norm(h.reshape(-1, 12, 1), groups, weight.double(), bias.double(), eps=1e-6).reshape(h.shape)
        got = layernorm_fn(x, weight, bias, z=z, eps=1e-6, group_size=group, norm_before_gate=before)
    if before:
        want = want * F.silu(z.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_split_conv1d_scan_is_conv_then_scan_then_gated_norm_and_projection():
    """The fused Mamba-2 block op, an MLP share included, against its parts written out in float64:
    depthwise causal conv + silu, the recurrence, the gated RMSNorm over ngroups groups, out_proj."""
    g = torch.Generator().manual_seed(7)
    batch, seqlen, nheads, headdim, ngroups, dstate, width, mlp = 2, 19, 4, 8, 2, 6, 4, 5
    dim, xbc = nheads * headdim, nheads * headdim + 2 * ngroups * dstate
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    zxbcdt, conv_w, conv_b = r(batch, seqlen, 2 * mlp + dim + xbc + nheads), r(xbc, width) * 0.5, r(xbc)
    dt_bias, A, D = r(nheads) * 0.3, -torch.rand(nheads, generator=g) - 0.2, r(nheads, headdim)
    norm_w, out_w, out_b = r(dim), r(11, mlp + dim), r(11)
    got = mamba_split_conv1d_scan_combined(zxbcdt, conv_w, conv_b, dt_bias, A, D, chunk_size=8,
                                           rmsnorm_weight=norm_w, rmsnorm_eps=1e-5, outproj_weight=out_w,
                                           outproj_bias=out_b, ngroups=ngroups, norm_before_gate=False)
    z0, x0, z, xBC, dt = torch.split(zxbcdt.double(), [mlp, mlp, dim, xbc, nheads], dim=-1)
    padded = F.pad(xBC.transpose(1, 2), (width - 1, 0))
    conv = sum(padded[..., k:k + seqlen] * conv_w.double()[:, k, None] for k in range(width)) + conv_b.double()[:, None]
    xs, B, C = torch.split(F.silu(conv).transpose(1, 2), [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    y, _ = ssd_float64(xs.unflatten(-1, (nheads, headdim)), dt, A, B.unflatten(-1, (ngroups, dstate)),
                       C.unflatten(-1, (ngroups, dstate)), D=D, dt_bias=dt_bias, softplus=True)
    gated = (y.flatten(-2) * F.silu(z)).unflatten(-1, (ngroups, -1))
    normed = (gated / gated.square().mean(-1, keepdim=True).add(1e-5).sqrt()).flatten(-2) * norm_w.double()
    want = F.linear(torch.cat([F.silu(z0) * x0, normed], -1), out_w.double(), out_b.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
