"""PyTorch path of the selective scan: a chunked scan, autograd through its ops.

Inside a chunk of T steps the states are ``x_t = (x_in' + cumsum_k(v_k E_k)) / E_t`` with
``E_t = exp(-A * sum(delta' after the chunk's first step up to t))``: one exp, one cumsum and a few
multiplies per state element, all vectorised, laid out (batch, channels, d_state, step-in-chunk,
chunk) so every pass runs along contiguous rows of chunks. ``E`` grows like ``exp(|A| sum delta')``,
so T is the longest power of two whose chunks keep that exponent under ``max_log_range``
(data-dependent; under torch.compile the log-space scan below, whose shapes do not depend on the
data). The chunk entry states ``x_in'`` are the same recurrence one level up, over
chunks, in float64 (where the bound is ~600); where even single steps decay beyond the bound, a
log-space scan (float64 ``logcumsumexp`` of the positive and negative parts) is exact at any
decay. Channels go in blocks small enough to stay in cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import _complex_bc, _effective_delta, _gate, _to_compute

# --------------------------------------------------------------------------------------------
# PyTorch path: chunked scan
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChunkedScanConfig:
    """The PyTorch path's chunking.

    ``max_chunk``: longest chunk (a power of two). ``max_log_range``: bound on ``|A| * sum(delta')``
    inside a float32 chunk, so ``exp`` of it stays far inside float32 and the rounding of the exponent
    (relative error <= ~range * eps, ~1e-7 measured at 24..64) stays small; float64 levels (the scans
    over chunks) allow ``max_log_range_f64``. ``block_elements``: batch x channels x d_state x length per channel block,
    sized to stay in cache.
    """
    max_chunk: int = 64
    max_log_range: float = 48.0
    max_log_range_f64: float = 600.0
    block_elements: int = 1 << 20


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def _chunk_len(rate: Tensor, dl: Tensor, max_chunk: int, max_range: float) -> int:
    """Longest power-of-two chunk <= max_chunk whose in-chunk exponent |A| * sum(delta') stays <= max_range.

    rate (db,) = max_n |A[d, n]|; dl (b, db, L) delta' (>= 0).
    Under torch.compile (and export) 1, the log-space scan: the chunk length would be read from the
    data, a host sync and data-dependent shapes that a whole graph cannot hold.
    """
    if torch.compiler.is_compiling():
        return 1
    T = min(max_chunk, _next_pow2(dl.shape[-1]))
    dl = F.pad(dl, (0, (-dl.shape[-1]) % T)).detach()
    while T > 1:
        chunks = dl.view(*dl.shape[:2], -1, T)
        span = chunks.sum(-1) - chunks[..., 0]  # sum of delta' after each chunk's first step
        if float((span * rate[:, None]).amax()) <= max_range:
            break
        T //= 2
    return T


def _time_major(x: Tensor, T: int) -> Tensor:
    """(..., L) with L = nc * T -> (..., T, nc): step s of every chunk side by side, so the per-step work
    and the cumsum over steps run along contiguous rows of nc chunks."""
    return x.unflatten(-1, (-1, T)).transpose(-1, -2).contiguous()


def _log_space_states(A: Tensor, dl: Tensor, v: Tensor) -> Tensor:
    """All states, exact at any decay: x_t = sum_{k<=t} exp(A (Gamma_t - Gamma_k)) v_k, Gamma = cumsum(delta').

    A (db, n); dl (b, db, L); v (b, db, n, L) -> (b, db, n, L) float64 (complex128 for complex A).
    Evaluated as ``exp(A Gamma_t + logcumsumexp_k(log v_k - A Gamma_k))`` for the positive and
    negative parts of v. Complex A: the rotation exp(i Im(A) Gamma) factors out of the sum, leaving
    this real scan with Re(A) for the real and imaginary parts of v exp(-i Im(A) Gamma).
    """
    if A.is_complex():
        rot = torch.polar(torch.ones((), dtype=torch.float64, device=dl.device),
                          A.imag.double()[None, :, :, None] * dl.double().cumsum(-1)[:, :, None, :])
        w = v.to(torch.complex128) * rot.conj()
        return torch.complex(_log_space_states(A.real, dl, w.real), _log_space_states(A.real, dl, w.imag)) * rot
    alpha = A.double()[None, :, :, None] * dl.double().cumsum(-1)[:, :, None, :]
    v = v.double()
    tiny = torch.finfo(torch.float64).tiny  # log(0) would poison autograd
    states = 0.0
    for sign, part in ((1.0, v.clamp_min(0.0)), (-1.0, (-v).clamp_min(0.0))):
        states = states + sign * torch.exp(alpha + torch.logcumsumexp(part.clamp_min(tiny).log() - alpha, dim=-1))
    return states


def _scan_states(A: Tensor, dl: Tensor, factors: tuple, cfg: ChunkedScanConfig) -> tuple:
    """All states of x_t = exp(delta'_t A) x_{t-1} + v_t, x_{-1} = 0, v = product of ``factors``.

    A (db, n) real or complex; dl (b, db, L) delta'; factors broadcast to (b, db, n, L). Works in
    dl's dtype (its complex counterpart for complex A: the decay exp(delta' A) then also rotates, and
    only Re(A) bounds the chunks).
    Returns (states (b, db, n, T, nc) in time-major chunk layout, T), L padded to nc * T with steps
    that leave the state unchanged. The chunk entry states come from this same function one level
    up (over chunks, in float64), down to ``_log_space_states`` when even single steps decay too far.
    """
    max_range = cfg.max_log_range if dl.dtype != torch.float64 else cfg.max_log_range_f64
    T = _chunk_len(A.detach().real.abs().amax(-1), dl, cfg.max_chunk, max_range)
    L = dl.shape[-1]
    pad = (-L) % T
    dl = F.pad(dl, (0, pad))
    factors = [F.pad(f, (0, pad)) for f in factors]
    if T == 1:
        v = factors[0]
        for f in factors[1:]:
            v = v * f
        return _to_compute(_log_space_states(A, dl, v), dl.dtype).unsqueeze(-2), 1
    nc = (L + pad) // T
    dlt = _time_major(dl, T)                                           # (b, db, T, nc)
    rel = (dlt.cumsum(-2) - dlt[..., :1, :]).unsqueeze(2)              # >= 0, zero at each chunk's first step
    a = _to_compute(A, dl.dtype)[None, :, :, None, None]
    # in-place exp_ and cumsum_ are autograd-safe here (the products save their inputs, not outputs)
    grow = (rel * -a).exp_()                                           # E_t, in [1, exp(max_range)]
    acc = grow
    for f in factors:
        acc = acc * _time_major(f, T)
    acc = acc.cumsum_(3)
    if nc > 1:
        h_end = acc[:, :, :, -1] / grow[:, :, :, -1]                  # chunk-local end states (b, db, n, nc)
        chunk_states, _ = _scan_states(A, dlt.sum(2).double(), (_to_compute(h_end, torch.float64),), cfg)
        chunk_states = chunk_states.transpose(-1, -2).flatten(-2)[..., :nc]   # state after each chunk
        # state entering chunk c, already decayed by its first step
        first_decay = torch.exp(_to_compute(A, torch.float64)[None, :, :, None] * dlt[:, :, None, 0, 1:].double())
        entry = torch.cat([torch.zeros_like(h_end[..., :1]),
                           (first_decay * chunk_states[..., :-1]).to(h_end.dtype)], dim=-1)
        acc = acc + entry.unsqueeze(3)
    return acc / grow, T


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                          cfg: ChunkedScanConfig = ChunkedScanConfig()):
    """Chunked PyTorch scan -> (out (b, d, l) in u's dtype, last state (b, d, n) in the compute dtype,
    complex for complex A). Every form of :func:`~.reference.selective_scan_ref`."""
    dl = _effective_delta(delta, delta_bias, delta_softplus)
    ct = dl.dtype
    b, d, l = u.shape
    n = A.shape[1]
    uc = u.to(ct)
    du = dl * uc
    cplx = A.is_complex()
    Bc, Cc = (_complex_bc(X, ct) if cplx else X.to(ct) for X in (B, C))
    block = max(1, min(d, cfg.block_elements // max(1, b * n * l)))
    ys, lasts = [], []
    for d0 in range(0, d, block):
        d1 = min(d, d0 + block)
        states, T = _scan_states(A[d0:d1], dl[:, d0:d1], (du[:, d0:d1, None], _channel_rows(Bc, d0, d1, d, l)), cfg)
        y = (states * _time_major(F.pad(_channel_rows(Cc, d0, d1, d, l), (0, (-l) % T)), T)).sum(2)
        ys.append((2 * y.real if cplx else y).transpose(-1, -2).flatten(-2)[..., :l])
        lasts.append(states[..., -1, -1])  # the padding steps keep the state
    y = torch.cat(ys, dim=1)
    return _gate(y, uc, D, z).to(u.dtype), torch.cat(lasts, dim=1)


def _channel_rows(X: Tensor, d0: int, d1: int, d: int, l: int) -> Tensor:
    """B or C, (b, n, l) or (b, g, n, l) -> the rows of channels d0:d1, (b, d1-d0 or 1, n, l);
    time-invariant (d, n) -> (1, d1-d0, n, l), an expanded view (a block's worth once padded)."""
    if X.dim() == 2:
        return X[None, d0:d1, :, None].expand(-1, -1, -1, l)
    if X.dim() == 3:
        return X.unsqueeze(1)
    per_group = d // X.shape[1]
    g0, g1 = d0 // per_group, (d1 - 1) // per_group
    if g0 == g1:
        return X[:, g0:g0 + 1]
    return X[:, torch.arange(d0, d1, device=X.device) // per_group]

