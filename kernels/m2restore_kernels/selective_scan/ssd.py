"""Mamba-2's scan (SSD) and its fused block op with mamba_ssm's signatures, on :func:`selective_scan`.

Mamba-2's recurrence is Mamba-1's with one scalar decay per head. For head h, its channel p and
state n, with dt' = clamp(softplus(dt + dt_bias)) (softplus and the bias where asked):

    s_t[h, p, n] = exp(dt'_t[h] A[h]) s_{t-1}[h, p, n] + dt'_t[h] B_t[g(h), n] x_t[h, p]
    y_t[h, p] = sum_n C_t[g(h), n] s_t[h, p, n] + D[h(, p)] x_t[h, p],   times silu(z_t[h, p]) if z

where head h reads group g(h) = h // (nheads / ngroups). So the nheads * headdim channels are the
selective scan's channels, A and dt are broadcast over each head's channels, and B and C are its
grouped (b, g, n, l) form. Upstream's ``chunk_size`` is a GPU blocking of the same sums: accepted,
and it changes nothing here. ``seq_idx`` restarts the state where it changes (packed sequences):
each run of equal ids is scanned on its own.

``initial_states`` (a start state, transformers' chunked prefill from its cache) works by
linearity: the scan runs from zero and the start state's decayed contribution is added to every
output and to the last state. Not covered (a ValueError names it): ``initial_states`` together with
``seq_idx``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..causal_conv1d import causal_conv1d_fn
from . import selective_scan

__all__ = ["mamba_chunk_scan_combined", "mamba_split_conv1d_scan_combined", "layernorm_fn", "rmsnorm_fn",
           "RMSNormGated"]

NO_LIMIT = (0.0, math.inf)


def _fail(op: str, message: str):
    raise ValueError(f"{op}: {message}")


def _runs(seq_idx: Optional[Tensor], batch: int, seqlen: int) -> list:
    """(batch row, first, end) of each run of equal ``seq_idx`` (b, l); one (None: every row, 0,
    seqlen) without it."""
    if seq_idx is None:
        return [(None, 0, seqlen)]
    if seq_idx.shape != (batch, seqlen):
        _fail("mamba_chunk_scan_combined", f"seq_idx must be (batch, seqlen) = {(batch, seqlen)}, got {tuple(seq_idx.shape)}")
    runs = []
    for row in range(batch):
        starts = [0] + (torch.nonzero(seq_idx[row, 1:] != seq_idx[row, :-1]).flatten() + 1).tolist() + [seqlen]
        runs += [(row, lo, hi) for lo, hi in zip(starts[:-1], starts[1:]) if hi > lo]
    return runs


def _step_sizes(dt: Tensor, dt_bias: Optional[Tensor], softplus: bool, limit) -> Tensor:
    """dt' as upstream forms it: the bias, then softplus, then the clamp (only for a limit of its
    own: none at the default (0, inf))."""
    step = dt if dt_bias is None else dt + dt_bias
    step = F.softplus(step) if softplus else step
    return step if tuple(limit) == NO_LIMIT else step.clamp(min=limit[0], max=limit[1])


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                              seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=NO_LIMIT,
                              return_final_states=False, return_varlen_states=False, backend: str = "auto"):
    """mamba_ssm's ``mamba_chunk_scan_combined`` (see the module docstring for the recurrence).

    x, z: (batch, seqlen, nheads, headdim); dt: (batch, seqlen, nheads); A, dt_bias: (nheads,);
    initial_states: (batch, nheads, headdim, dstate), the state before the first step (not with seq_idx);
    B, C: (batch, seqlen, ngroups, dstate), ngroups dividing nheads; D: (nheads, headdim) or
    (nheads,); seq_idx: (batch, seqlen) int; cu_seqlens: (nseq + 1,) int, with
    ``return_varlen_states`` only (batch 1; rising from 0, at most seqlen, empty sequences allowed).
    Returns out (batch, seqlen, nheads, headdim) in x's dtype; with ``return_final_states`` also the
    last state (batch, nheads, headdim, dstate), and with ``return_varlen_states`` each sequence's
    last state from a zero start (nseq, nheads, headdim, dstate), both float32 (float64 for float64 dt). Differentiable
    in every floating input. ``backend`` as :func:`selective_scan`'s.
    """
    op = "mamba_chunk_scan_combined"
    if x.dim() != 4:
        _fail(op, f"x must be (batch, seqlen, nheads, headdim), got {tuple(x.shape)}")
    batch, seqlen, nheads, headdim = x.shape
    if B.dim() != 4 or B.shape[:2] != (batch, seqlen) or C.shape != B.shape:
        _fail(op, f"B and C must be (batch, seqlen, ngroups, dstate) with (batch, seqlen) = {(batch, seqlen)}, "
                  f"got {tuple(B.shape)} and {tuple(C.shape)}")
    ngroups, dstate = B.shape[2:]
    if ngroups == 0 or nheads % ngroups:
        _fail(op, f"ngroups ({ngroups}) must divide nheads ({nheads})")
    if dt.shape != (batch, seqlen, nheads) or A.shape != (nheads,):
        _fail(op, f"dt must be {(batch, seqlen, nheads)} and A ({nheads},), got {tuple(dt.shape)} and {tuple(A.shape)}")
    if D is not None and D.shape not in ((nheads, headdim), (nheads,)):
        _fail(op, f"D must be ({nheads}, {headdim}) or ({nheads},), got {tuple(D.shape)}")
    if z is not None and z.shape != x.shape:
        _fail(op, f"z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    if dt_bias is not None and dt_bias.shape != (nheads,):
        _fail(op, f"dt_bias must be ({nheads},), got {tuple(dt_bias.shape)}")
    if initial_states is not None:
        if seq_idx is not None:
            _fail(op, "initial_states with seq_idx is not supported by m2restore_kernels; pass one of them")
        if initial_states.shape != (batch, nheads, headdim, dstate):
            _fail(op, f"initial_states must be {(batch, nheads, headdim, dstate)}, got {tuple(initial_states.shape)}")
    if return_varlen_states:
        if cu_seqlens is None or batch != 1:
            _fail(op, "return_varlen_states needs cu_seqlens and batch 1")
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] > seqlen or any(b < a for a, b in zip(bounds, bounds[1:])):
            _fail(op, f"cu_seqlens must rise from 0 to at most seqlen ({seqlen}), got {bounds}")
    dim = nheads * headdim
    # The selective scan's layout: channels (h, p), time last.
    channels = lambda t: t.reshape(t.shape[0], t.shape[1], dim).transpose(1, 2)  # noqa: E731
    per_channel = lambda t: t.repeat_interleave(headdim, dim=-1)  # noqa: E731  (..., nheads) -> (..., dim)
    delta, delta_bias, softplus = dt, dt_bias, dt_softplus
    if tuple(dt_limit) != NO_LIMIT:  # the clamp comes after bias and softplus, so they go first
        delta, delta_bias, softplus = _step_sizes(dt, dt_bias, dt_softplus, dt_limit), None, False
    # A start state gates through z after its own term is added, so z waits for it (below).
    gate_later = z is not None and initial_states is not None
    u, delta = channels(x), per_channel(delta).transpose(1, 2)
    zc = None if z is None or gate_later else channels(z)
    A_full = per_channel(A).unsqueeze(-1).expand(dim, dstate)
    Bg, Cg = B.permute(0, 2, 3, 1), C.permute(0, 2, 3, 1)
    Dc = None if D is None else (D.reshape(dim) if D.dim() == 2 else per_channel(D))
    bias = None if delta_bias is None else per_channel(delta_bias)

    def scan(row: Optional[int], lo: int, hi: int):
        rows = slice(None) if row is None else slice(row, row + 1)
        piece = lambda t: None if t is None else t[rows, ..., lo:hi]  # noqa: E731
        return selective_scan(piece(u), piece(delta), A_full, piece(Bg), piece(Cg), Dc, piece(zc), bias, softplus,
                              return_last_state=True, backend=backend)

    runs = {run: scan(*run) for run in _runs(seq_idx, batch, seqlen)}
    if seq_idx is None:
        out, last = runs[None, 0, seqlen]
    else:
        rows = [[result for (row, _, _), result in runs.items() if row == r] for r in range(batch)]
        out = torch.cat([torch.cat([o for o, _ in row], dim=-1) for row in rows])
        last = torch.cat([row[-1][1] for row in rows])  # a row's last state is its last run's
    result = out.transpose(1, 2).reshape(batch, seqlen, nheads, headdim)
    heads = lambda s: s.reshape(s.shape[0], nheads, headdim, dstate)  # noqa: E731
    last = heads(last)
    if initial_states is not None:
        # The recurrence is linear in its state: from a start S0 it adds S0 decayed by
        # exp(A cumsum(dt')) to every state, and C_t of that to every output.
        compute = torch.promote_types(dt.dtype, torch.float32)
        step = _step_sizes(dt.to(compute), dt_bias, dt_softplus, dt_limit)
        decay = torch.exp(torch.cumsum(step * A.to(compute), dim=1))  # (b, l, h)
        start = initial_states.to(compute)
        C_heads = C.to(compute).repeat_interleave(nheads // ngroups, dim=2)  # (b, l, h, n)
        carried = torch.einsum("blhn,bhpn->blhp", C_heads, start) * decay[..., None]
        result = result + carried.to(result.dtype)
        if gate_later:
            result = result * F.silu(z)
        last = last + decay[:, -1, :, None, None] * start
    extra = []
    if return_final_states:
        extra.append(last)
    if return_varlen_states:
        # Each sequence's state from a zero start: its run's where seq_idx restarted there, its own
        # scan where not, and zeros for an empty one (upstream's padding slot).
        states = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            if hi == lo:
                states.append(last.new_zeros(1, dim, dstate))
            else:
                states.append(runs[0, lo, hi][1] if (0, lo, hi) in runs else scan(0, lo, hi)[1])
        extra.append(heads(torch.cat(states)))
    return (result, *extra) if extra else result


def layernorm_fn(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True, is_rms_norm=False):
    """mamba_ssm's gated norm (``ops.triton.layernorm_gated``): LayerNorm (RMSNorm with
    ``is_rms_norm``) over groups of ``group_size`` features of the last axis (all of it for None),
    times ``weight`` plus ``bias``; with z, times silu(z) after the norm (``norm_before_gate``) or
    of x * silu(z). x, z (..., d); weight, bias (d,). Float32 inside, out in x's dtype."""
    d = x.shape[-1]
    group = d if group_size is None else group_size
    if group <= 0 or d % group:
        raise ValueError(f"layernorm_fn: group_size ({group_size}) must divide the last dimension ({d})")
    h = x.float()
    if z is not None and not norm_before_gate:
        h = h * F.silu(z.float())
    h = h.unflatten(-1, (d // group, group))
    if not is_rms_norm:
        h = h - h.mean(-1, keepdim=True)
    out = (h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)).flatten(-2) * weight.float()
    if bias is not None:
        out = out + bias.float()
    if z is not None and norm_before_gate:
        out = out * F.silu(z.float())
    return out.to(x.dtype)


def rmsnorm_fn(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    """:func:`layernorm_fn` with ``is_rms_norm=True`` (mamba_ssm's ``rmsnorm_fn``)."""
    return layernorm_fn(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm=True)


class RMSNormGated(torch.nn.Module):
    """mamba_ssm's gated ``RMSNorm`` module (``ops.triton.layernorm_gated``, Mamba-2's ``norm``):
    weight (hidden_size,) initialised to ones, no bias; forward(x, z=None) is :func:`rmsnorm_fn`."""

    def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True, device=None, dtype=None):
        super().__init__()
        self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x, z=None):
        return rmsnorm_fn(x, self.weight, self.bias, z=z, eps=self.eps, group_size=self.group_size,
                          norm_before_gate=self.norm_before_gate)


def mamba_split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                     initial_states=None, seq_idx=None, dt_limit=NO_LIMIT, return_final_states=False,
                                     activation="silu", rmsnorm_weight=None, rmsnorm_eps=1e-6, outproj_weight=None,
                                     outproj_bias=None, headdim=None, ngroups=1, norm_before_gate=True,
                                     backend: str = "auto"):
    """mamba_ssm's ``mamba_split_conv1d_scan_combined``: Mamba-2's block after in_proj.

    zxbcdt (batch, seqlen, 2 m + 2 dim + 2 ngroups dstate + nheads) splits into [z0 x0 | z | xBC |
    dt] (the first 2 m features an optional gated MLP, silu(z0) * x0); xBC goes through the causal
    depthwise conv (conv1d_weight (dim + 2 ngroups dstate, width), activation None/"silu"/"swish",
    restarting at ``seq_idx``) and splits into x, B, C for :func:`mamba_chunk_scan_combined` (dt
    with dt_bias and softplus, clamped to dt_limit). z gates the scan, or, with rmsnorm_weight (dim,),
    the gated RMSNorm over ngroups groups (:func:`rmsnorm_fn`); then [MLP | scan] through
    outproj_weight (out_dim, m + dim) and outproj_bias where given. D: (nheads, headdim),
    or (nheads,) with ``headdim``. Returns out (batch, seqlen, out_dim or m + dim), and with
    ``return_final_states`` the scan's last state (batch, nheads, headdim, dstate). Forward and
    backward are this package's conv and scan composed (autograd through the rest).
    """
    op = "mamba_split_conv1d_scan_combined"
    if activation not in (None, "silu", "swish"):
        _fail(op, f"activation must be None, 'silu' or 'swish', got {activation!r}")
    if D.dim() == 1:
        if headdim is None:
            _fail(op, "D of shape (nheads,) needs headdim")
        nheads = D.shape[0]
    else:
        nheads, headdim = D.shape
    dim = nheads * headdim
    batch, seqlen, width = zxbcdt.shape
    xbc = conv1d_weight.shape[0]
    dstate = (xbc - dim) // (2 * ngroups)
    mlp = (width - dim - xbc - nheads) // 2
    if xbc != dim + 2 * ngroups * dstate or mlp < 0 or width != 2 * mlp + dim + xbc + nheads:
        _fail(op, f"zxbcdt's last dimension ({width}) must be 2 m + {dim} + {xbc} + {nheads} for conv1d_weight "
                  f"{tuple(conv1d_weight.shape)}, nheads {nheads}, headdim {headdim}, ngroups {ngroups}")
    z0x0, z, xBC, dt = torch.split(zxbcdt, [2 * mlp, dim, xbc, nheads], dim=-1)
    xBC = causal_conv1d_fn(xBC.transpose(1, 2), conv1d_weight, conv1d_bias, seq_idx=seq_idx,
                           activation=activation, backend=backend).transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    heads = lambda t: t.unflatten(-1, (nheads, headdim))  # noqa: E731
    groups = lambda t: t.unflatten(-1, (ngroups, dstate))  # noqa: E731
    scan = mamba_chunk_scan_combined(heads(x), dt, A, groups(B), groups(C), chunk_size, D=D,
                                     z=None if rmsnorm_weight is not None else heads(z), dt_bias=dt_bias,
                                     initial_states=initial_states, seq_idx=seq_idx, dt_softplus=True,
                                     dt_limit=dt_limit, return_final_states=True, backend=backend)
    y, last = scan[0].flatten(-2), scan[1]
    if rmsnorm_weight is not None:
        y = rmsnorm_fn(y, rmsnorm_weight, None, z=z, eps=rmsnorm_eps, group_size=dim // ngroups,
                       norm_before_gate=norm_before_gate)
    if mlp:
        z0, x0 = z0x0.chunk(2, dim=-1)
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    if outproj_weight is not None:
        y = F.linear(y, outproj_weight, outproj_bias)
    return (y, last) if return_final_states else y
