"""Selective scan (Mamba's S6 recurrence) with the signature and semantics of mamba_ssm's ``selective_scan_fn``.

Per batch b, channel d and state n (delta' = softplus(delta + delta_bias) or delta + delta_bias):

    x_t = exp(delta'_t A[d, n]) x_{t-1} + delta'_t B[n, t] u_t,    x_{-1} = 0
    y_t = sum_n C[n, t] x_t[n];    out = (y + D u) * silu(z)

B and C are shared by all channels, (b, n, l), or by the channels of one of g groups, (b, g, n, l)
(channel d reads group d // (d_inner / g)). A is real, (d, n).

Three implementations:

* ``selective_scan_ref``: the recurrence one step at a time, the float reference of the tests.
* PyTorch path (CPU, or wherever Triton cannot run): a chunked scan. Inside a chunk of T steps the
  states are ``x_t = (x_in' + cumsum_k(v_k E_k)) / E_t`` with ``E_t = exp(-A * sum(delta' after the
  chunk's first step up to t))``: one exp, one cumsum and a few multiplies per state element, all
  vectorised, laid out (batch, channels, d_state, step-in-chunk, chunk) so every pass runs along
  contiguous rows of chunks. ``E`` grows like ``exp(|A| sum delta')``, so T is the longest power of
  two whose chunks keep that exponent under ``max_log_range`` (data-dependent). The chunk entry
  states ``x_in'`` are the same recurrence one level up, over chunks, in float64 (where the bound is
  ~600); where even single steps decay beyond the bound, a log-space scan (float64
  ``logcumsumexp`` of the positive and negative parts) is exact at any decay. Channels go in blocks
  small enough to stay in cache. Gradients: autograd through these ops.
* Native CPU path (``backend="torch"`` on CPU, float32/16/bf16): the recurrence as one fused C loop
  (``csrc/selective_scan_cpu.c``, built on first use by ``_native``), channels in parallel, each
  channel's states in registers; the backward recomputes each chunk of states from checkpoints and
  runs the adjoint recurrence backwards, like the Triton kernels. Without a C compiler (or with
  ``M2RESTORE_NATIVE=0``), and for float64, the chunked scan above runs instead.
* Triton path: one program per (batch, group, block of channels) keeps its (BLOCK_D, d_state)
  states in registers and walks the sequence a chunk of CHUNK steps at a time. A chunk's inputs
  load as contiguous (channels, steps) tiles and its steps x -> a_t x + b_t compose in a parallel
  scan (``tl.associative_scan``); the state entering the chunk applies through the cumulative
  decay, and the forward keeps it as the chunk's checkpoint. The backward walks the chunks in
  reverse: it recomputes the chunk's states (and, by the same scan over steps shifted by one, the
  states before each step) from the checkpoint, then gets the adjoint dLoss/dx_t of every step
  from one reverse scan of G_t = C_t dy_t + a_{t+1} G_{t+1}. Cross-channel gradients (B, C) and
  cross-batch ones (A, D, delta_bias) are written as per-program partial sums and reduced in
  PyTorch, so results are deterministic.

``backend="auto"`` on CUDA uses mamba_ssm's own kernel when that package imports (it is imported
lazily, never on CPU), else the Triton path.
"""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _native
from ._backend import extension_op, resolve_backend
from ._triton import jit, tl, triton


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _effective_delta(delta: Tensor, delta_bias: Optional[Tensor], delta_softplus: bool) -> Tensor:
    """delta (b, d, l) -> delta' in the compute dtype."""
    delta = delta.to(_compute_dtype(delta.dtype))
    if delta_bias is not None:
        delta = delta + delta_bias.to(delta.dtype)[:, None]
    return F.softplus(delta) if delta_softplus else delta


def _per_channel(X: Tensor, d: int) -> Tensor:
    """B or C, (b, n, l) or (b, g, n, l) -> (b, d or 1, n, l), channel c reading group c // (d / g)."""
    if X.dim() == 3:
        return X.unsqueeze(1)
    return X.repeat_interleave(d // X.shape[1], dim=1)


def _gate(y: Tensor, u: Tensor, D: Optional[Tensor], z: Optional[Tensor]) -> Tensor:
    if D is not None:
        y = y + u.to(y.dtype) * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """Sequential reference, one time step at a time (float32, or float64 for float64 inputs).

    u, delta, z: (b, d, l); A: (d, n); B, C: (b, n, l) or (b, g, n, l); D, delta_bias: (d,).
    Returns out (b, d, l) in u's dtype, and with ``return_last_state`` also x_{l-1} (b, d, n) in the
    compute dtype.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    dlt = _effective_delta(delta, delta_bias, delta_softplus)
    ct = dlt.dtype
    d = u.shape[1]
    A, uc = A.to(ct), u.to(ct)
    Bd, Cd = _per_channel(B.to(ct), d), _per_channel(C.to(ct), d)
    x = uc.new_zeros(u.shape[0], d, A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        x = torch.exp(dlt[:, :, t, None] * A) * x + (dlt[:, :, t] * uc[:, :, t])[..., None] * Bd[..., t]
        ys.append((x * Cd[..., t]).sum(-1))
    y = torch.stack(ys, dim=2) if ys else uc.new_zeros(u.shape)
    out = _gate(y, uc, D, z).to(u.dtype)
    return (out, x) if return_last_state else out


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _check_inputs(u, delta, A, B, C, D, z, delta_bias):
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, dim, seqlen), got shape {tuple(u.shape)}")
    b, d, l = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (dim={d}, dstate), got shape {tuple(A.shape)}")
    if A.is_complex():
        raise ValueError("A must be real (complex A is not supported)")
    n = A.shape[1]
    for name, X in (("B", B), ("C", C)):
        if X.dim() == 3:
            ok = X.shape == (b, n, l)
        elif X.dim() == 4:
            ok = X.shape[0] == b and X.shape[2:] == (n, l) and X.shape[1] >= 1 and d % X.shape[1] == 0
        else:
            ok = False
        if not ok:
            raise ValueError(f"{name} must be (batch={b}, dstate={n}, seqlen={l}) or (batch, groups, dstate, seqlen) "
                             f"with groups dividing dim={d}; got shape {tuple(X.shape)}")
    for name, X in (("D", D), ("delta_bias", delta_bias)):
        if X is not None and X.shape != (d,):
            raise ValueError(f"{name} must be (dim={d},), got shape {tuple(X.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None]
    if any(t.device != u.device for t in tensors):
        raise ValueError("all inputs must be on one device")
    if any(not t.is_floating_point() for t in tensors):
        raise ValueError("all inputs must be floating point")


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
    """
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

    A (db, n); dl (b, db, L); v (b, db, n, L) -> (b, db, n, L) float64. Evaluated as
    ``exp(A Gamma_t + logcumsumexp_k(log v_k - A Gamma_k))`` for the positive and negative parts of v.
    """
    alpha = A.double()[None, :, :, None] * dl.double().cumsum(-1)[:, :, None, :]
    v = v.double()
    tiny = torch.finfo(torch.float64).tiny  # log(0) would poison autograd
    states = 0.0
    for sign, part in ((1.0, v.clamp_min(0.0)), (-1.0, (-v).clamp_min(0.0))):
        states = states + sign * torch.exp(alpha + torch.logcumsumexp(part.clamp_min(tiny).log() - alpha, dim=-1))
    return states


def _scan_states(A: Tensor, dl: Tensor, factors: tuple, cfg: ChunkedScanConfig) -> tuple:
    """All states of x_t = exp(delta'_t A) x_{t-1} + v_t, x_{-1} = 0, v = product of ``factors``.

    A (db, n); dl (b, db, L) delta'; factors broadcast to (b, db, n, L). Works in dl's dtype.
    Returns (states (b, db, n, T, nc) in time-major chunk layout, T), L padded to nc * T with steps
    that leave the state unchanged. The chunk entry states come from this same function one level
    up (over chunks, in float64), down to ``_log_space_states`` when even single steps decay too far.
    """
    max_range = cfg.max_log_range if dl.dtype != torch.float64 else cfg.max_log_range_f64
    T = _chunk_len(A.detach().abs().amax(-1), dl, cfg.max_chunk, max_range)
    L = dl.shape[-1]
    pad = (-L) % T
    dl = F.pad(dl, (0, pad))
    factors = [F.pad(f, (0, pad)) for f in factors]
    if T == 1:
        v = factors[0]
        for f in factors[1:]:
            v = v * f
        return _log_space_states(A, dl, v).to(dl.dtype).unsqueeze(-2), 1
    nc = (L + pad) // T
    dlt = _time_major(dl, T)                                           # (b, db, T, nc)
    rel = (dlt.cumsum(-2) - dlt[..., :1, :]).unsqueeze(2)              # >= 0, zero at each chunk's first step
    a = A.to(dl.dtype)[None, :, :, None, None]
    # in-place exp_ and cumsum_ are autograd-safe here (the products save their inputs, not outputs)
    grow = (rel * -a).exp_()                                           # E_t, in [1, exp(max_range)]
    acc = grow
    for f in factors:
        acc = acc * _time_major(f, T)
    acc = acc.cumsum_(3)
    if nc > 1:
        h_end = acc[:, :, :, -1] / grow[:, :, :, -1]                  # chunk-local end states (b, db, n, nc)
        chunk_states, _ = _scan_states(A, dlt.sum(2).double(), (h_end.double(),), cfg)
        chunk_states = chunk_states.transpose(-1, -2).flatten(-2)[..., :nc]   # state after each chunk
        # state entering chunk c, already decayed by its first step
        first_decay = torch.exp(A.double()[None, :, :, None] * dlt[:, :, None, 0, 1:].double())
        entry = torch.cat([torch.zeros_like(h_end[..., :1]),
                           (first_decay * chunk_states[..., :-1]).to(h_end.dtype)], dim=-1)
        acc = acc + entry.unsqueeze(3)
    return acc / grow, T


def _selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                          cfg: ChunkedScanConfig = ChunkedScanConfig()):
    """Chunked PyTorch scan -> (out (b, d, l) in u's dtype, last state (b, d, n) in the compute dtype)."""
    dl = _effective_delta(delta, delta_bias, delta_softplus)
    ct = dl.dtype
    b, d, l = u.shape
    n = A.shape[1]
    uc = u.to(ct)
    du = dl * uc
    Bc, Cc = B.to(ct), C.to(ct)
    block = max(1, min(d, cfg.block_elements // max(1, b * n * l)))
    ys, lasts = [], []
    for d0 in range(0, d, block):
        d1 = min(d, d0 + block)
        states, T = _scan_states(A[d0:d1], dl[:, d0:d1], (du[:, d0:d1, None], _channel_rows(Bc, d0, d1, d)), cfg)
        y = (states * _time_major(F.pad(_channel_rows(Cc, d0, d1, d), (0, (-l) % T)), T)).sum(2)
        ys.append(y.transpose(-1, -2).flatten(-2)[..., :l])
        lasts.append(states[..., -1, -1])  # the padding steps keep the state
    y = torch.cat(ys, dim=1)
    return _gate(y, uc, D, z).to(u.dtype), torch.cat(lasts, dim=1)


def _channel_rows(X: Tensor, d0: int, d1: int, d: int) -> Tensor:
    """B or C, (b, n, l) or (b, g, n, l) -> the rows of channels d0:d1, (b, d1-d0 or 1, n, l)."""
    if X.dim() == 3:
        return X.unsqueeze(1)
    per_group = d // X.shape[1]
    g0, g1 = d0 // per_group, (d1 - 1) // per_group
    if g0 == g1:
        return X[:, g0:g0 + 1]
    return X[:, torch.arange(d0, d1, device=X.device) // per_group]


# --------------------------------------------------------------------------------------------
# Triton path
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScanKernelConfig:
    """Launch configuration of the Triton scan.

    ``block_d`` channels per program (a power of two that divides the channels per B/C group, so a
    program reads one group); ``block_n`` >= d_state (power of two); both kernels scan ``chunk``
    steps at a time (a power of two), and the forward checkpoints the states at every chunk's start
    for the backward; ``fwd_warps`` and ``bwd_warps`` are the kernels' warps per program.
    """
    block_d: int
    block_n: int
    chunk: int
    fwd_warps: int
    bwd_warps: int


def _kernel_config(d: int, l: int, n: int, channels_per_group: tuple, device: torch.device) -> ScanKernelConfig:
    """For d channels, l steps, n states; ``channels_per_group`` of the grouped ones among B and C."""
    # A program must not straddle two groups of B or C: block_d divides every group's channel count.
    cap = math.gcd(*channels_per_group) if channels_per_group else 1 << 30
    cap &= -cap  # its largest power-of-two divisor
    block_n = max(2, triton.next_power_of_2(n))
    chunk = min(64, max(16, triton.next_power_of_2(l)))  # a tile dimension: a power of two
    if device.type != "cuda":
        # The interpreter runs programs one after another at a fixed cost per step: few, wide programs.
        return ScanKernelConfig(min(cap, 64, triton.next_power_of_2(d)), block_n, chunk, fwd_warps=1, bwd_warps=1)
    # Across programs the parallelism is batch x channel blocks: narrow blocks give enough programs
    # for the SMs. The (block_d, block_n, chunk) scan tiles (4 x 16 x 64 float32 pairs) spread over
    # four warps in the forward and eight in the backward, which keeps about three times as many
    # such tiles live. Not yet tuned on a GPU.
    return ScanKernelConfig(min(cap, 4, triton.next_power_of_2(d)), block_n, chunk, fwd_warps=4, bwd_warps=8)


def _config_for(u: Tensor, B: Tensor, C: Tensor, n: int) -> ScanKernelConfig:
    d = u.shape[1]
    return _kernel_config(d, u.shape[2], n, tuple(d // X.shape[1] for X in (B, C) if X.dim() == 4), u.device)


@jit
def _softplus(x):
    # softplus(x) = max(x, 0) + log1p(exp(-|x|)), log1p by Goldberg's trick so tiny arguments keep
    # their relative precision; above 20 softplus(x) == x in float32 (torch's threshold).
    w = tl.exp(-tl.abs(x))
    onep = 1.0 + w
    log1p = tl.where(onep == 1.0, w, tl.log(onep) * w / (onep - 1.0))
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + log1p)


@jit
def _load_step(u_ptr, dlt_ptr, bias, offs, mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """u and delta' at ``offs`` (any tile shape), plus d(delta')/d(delta), all float32. Masked-off
    entries get delta' = 0: a step x -> exp(0 A) x + 0 u B is the identity."""
    uu = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    raw = tl.load(dlt_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += bias
    if SOFTPLUS:
        dt = _softplus(raw)
        ddt_draw = tl.where(raw > 20.0, 1.0, 1.0 / (1.0 + tl.exp(-raw)))
    else:
        dt = raw
        ddt_draw = tl.full(raw.shape, 1.0, tl.float32)
    return uu, tl.where(mask, dt, 0.0), ddt_draw


@jit
def _linear_recurrence(a1, b1, a2, b2):
    """Composition of the steps x -> a1 x + b1, then x -> a2 x + b2 (associative)."""
    return a1 * a2, a2 * b1 + b2


# How the backward runs its reverse-time scan: Triton's own ``reverse=True`` ("native"), or
# flip, forward scan, flip back ("flip"). Reverse scans with a non-commutative combine like this one
# have had wrong results on GPUs (triton-lang/triton#4362, Triton 3.0); upstream now tests this very
# combine reversed, but these kernels have not yet run on a GPU, so the CUDA parity tests run both
# and this picks the one the package uses. The interpreter computes both exactly.
REVERSE_SCAN = "native"


@jit
def _reverse_linear_scan(a, b, BY_FLIP: tl.constexpr):
    """Along axis 2, (a_t, b_t) composed with every later step: the adjoint's suffix scan."""
    if BY_FLIP:
        ra, rb = tl.associative_scan((tl.flip(a, 2), tl.flip(b, 2)), 2, _linear_recurrence)
        return tl.flip(ra, 2), tl.flip(rb, 2)
    return tl.associative_scan((a, b), 2, _linear_recurrence, reverse=True)


@jit
def _program_setup(A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, pid_b, pid_d, d, L, n, gB, gC, per_gB, per_gC,
                   HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """What both kernels know of program (batch pid_b, channel block pid_d): its channels and states
    with their masks, A (BLOCK_D, BLOCK_N), delta_bias and D as (BLOCK_D, 1) columns (0.0 if absent),
    the offsets of its rows of (b, d, L) tensors and the pointers of its B and C rows (BLOCK_N,)."""
    c0 = pid_d * BLOCK_D
    ch = c0 + tl.arange(0, BLOCK_D)
    ns = tl.arange(0, BLOCK_N)
    cmask = ch < d
    nmask = ns < n
    smask = cmask[:, None] & nmask[None, :]
    state_off = ch[:, None] * n + ns[None, :]
    A = tl.load(A_ptr + state_off, mask=smask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + ch, mask=cmask, other=0.0).to(tl.float32)[:, None] if HAS_BIAS else 0.0
    Dv = tl.load(D_ptr + ch, mask=cmask, other=0.0).to(tl.float32)[:, None] if HAS_D else 0.0
    rows = (pid_b * d + ch) * L
    b_rows = B_ptr + (pid_b * gB + c0 // per_gB) * n * L + ns * L
    c_rows = C_ptr + (pid_b * gC + c0 // per_gC) * n * L + ns * L
    return ch, ns, cmask, nmask, smask, state_off, A, bias, Dv, rows, b_rows, c_rows


@jit
def _chunk_states(u_ptr, dlt_ptr, b_rows, bias, A, h0, io, t, cmask, nmask, tmask,
                  HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """The states after each of a chunk's steps, (BLOCK_D, BLOCK_N, CHUNK), from the state h0
    (BLOCK_D, BLOCK_N) entering it: the steps x -> a_t x + b_t compose in one parallel scan and h0
    applies through their cumulative decay. ``io`` (BLOCK_D, CHUNK) and ``t`` (CHUNK,) address the
    steps, ``tmask`` (CHUNK,) keeps them; the others are identities. Also returns u, delta',
    d(delta')/d(delta) (BLOCK_D, CHUNK), B (1, BLOCK_N, CHUNK) and the decays a. The forward and
    the backward's recomputation share it, so they agree to the last bit."""
    uu, dt, ddt_draw = _load_step(u_ptr, dlt_ptr, bias, io, cmask[:, None] & tmask[None, :], HAS_BIAS, SOFTPLUS)
    Bt = tl.load(b_rows[:, None] + t[None, :], mask=nmask[:, None] & tmask[None, :], other=0.0).to(tl.float32)
    Bt = Bt[None, :, :]
    a = tl.exp(dt[:, None, :] * A[:, :, None])
    decay, inject = tl.associative_scan((a, (dt * uu)[:, None, :] * Bt), 2, _linear_recurrence)
    return uu, dt, ddt_draw, Bt, a, decay * h0[:, :, None] + inject


@jit
def _scan_fwd_kernel(u_ptr, dlt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, last_ptr, ckpt_ptr,
                     d, L, n, gB, gC, per_gB, per_gC, n_chunks,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    """Chunks of CHUNK steps in order, each as a whole: its (BLOCK_D, CHUNK) rows of u, delta, z and
    (BLOCK_N, CHUNK) of B, C load as contiguous tiles, and the CHUNK steps of x_t = a_t x_{t-1} + b_t
    compose in a parallel scan over (BLOCK_D, BLOCK_N, CHUNK); the state entering the chunk then
    applies through the scan's cumulative decay. A step-by-step loop instead waits on scattered
    loads at every step."""
    pid_b = tl.program_id(0)
    ch, ns, cmask, nmask, smask, state_off, A, bias, Dv, rows, b_rows, c_rows = _program_setup(
        A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, pid_b, tl.program_id(1), d, L, n, gB, gC, per_gB, per_gC,
        HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N)
    ts = tl.arange(0, CHUNK)
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for c in range(n_chunks):
        # state entering step c * CHUNK, for the backward's recomputation
        tl.store(ckpt_ptr + (pid_b * n_chunks + c) * d * n + state_off, h, mask=smask)
        t = c * CHUNK + ts
        tmask = t < L
        io = rows[:, None] + t[None, :]
        iomask = cmask[:, None] & tmask[None, :]
        # Steps past L are identities, so the last column is the chunk's end state.
        uu, _, _, _, _, states = _chunk_states(u_ptr, dlt_ptr, b_rows, bias, A, h, io, t, cmask, nmask, tmask,
                                               HAS_BIAS, SOFTPLUS)
        Ct = tl.load(c_rows[:, None] + t[None, :], mask=nmask[:, None] & tmask[None, :], other=0.0).to(tl.float32)
        y = tl.sum(states * Ct[None, :, :], axis=1)
        if HAS_D:
            y += Dv * uu
        if HAS_Z:
            zz = tl.load(z_ptr + io, mask=iomask, other=0.0).to(tl.float32)
            y *= zz / (1.0 + tl.exp(-zz))
        tl.store(out_ptr + io, y.to(out_ptr.dtype.element_ty), mask=iomask)
        h = tl.sum(tl.where(ts[None, None, :] == CHUNK - 1, states, 0.0), axis=2)
    tl.store(last_ptr + pid_b * d * n + state_off, h, mask=smask)


@jit
def _scan_bwd_kernel(u_ptr, dlt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, ckpt_ptr, dout_ptr, dlast_ptr,
                     du_ptr, ddlt_ptr, dz_ptr, dA_ptr, dD_ptr, dbias_ptr, dB_ptr, dC_ptr,
                     d, L, n, gB, gC, per_gB, per_gC, n_chunks, n_blocks,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                     HAS_DLAST: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
                     REVERSE_BY_FLIP: tl.constexpr):
    """Reverse-time adjoint, a chunk at a time from the last. With G_t = dLoss/dx_t and a_t = exp(dt_t A):
    G_t = C_t dy_t + a_{t+1} G_{t+1}, a linear recurrence backwards in time, so one reverse parallel
    scan per chunk gives all its G_t from the carry a_{t0+T} G_{t0+T} left by the chunk after it.
    The chunk's states x_t come from its checkpoint by the forward's scan, and x_{t-1} by the same
    scan over the steps shifted by one (never as (x_t - b_t) / a_t, which cancels or divides by ~0).
    dA, dD, dbias go out per batch, dB and dC per channel block (partial sums reduced by the caller).
    """
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    ch, ns, cmask, nmask, smask, state_off, A, bias, Dv, rows, b_rows, c_rows = _program_setup(
        A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, pid_b, pid_d, d, L, n, gB, gC, per_gB, per_gC,
        HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N)
    ts = tl.arange(0, CHUNK)
    A3 = A[:, :, None]
    part_rows = (pid_b * n_blocks + pid_d) * n * L + ns * L
    if HAS_DLAST:
        carry = tl.load(dlast_ptr + pid_b * d * n + state_off, mask=smask, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for ci in range(n_chunks):
        c = n_chunks - 1 - ci
        h0 = tl.load(ckpt_ptr + (pid_b * n_chunks + c) * d * n + state_off, mask=smask, other=0.0)
        t = c * CHUNK + ts
        tmask = t < L
        io = rows[:, None] + t[None, :]
        iomask = cmask[:, None] & tmask[None, :]
        nt_mask = nmask[:, None] & tmask[None, :]
        uu, dt, ddt_draw, Bt, a, states = _chunk_states(u_ptr, dlt_ptr, b_rows, bias, A, h0, io, t, cmask, nmask,
                                                        tmask, HAS_BIAS, SOFTPLUS)
        Ct = tl.load(c_rows[:, None] + t[None, :], mask=nt_mask, other=0.0).to(tl.float32)[None, :, :]
        # x_{t-1}: the scan of steps t - 1 (the chunk's first column gets the identity, so x_{t0-1} = h0)
        _, _, _, _, _, prev = _chunk_states(u_ptr, dlt_ptr, b_rows, bias, A, h0, io - 1, t - 1, cmask, nmask,
                                            (ts > 0) & tmask, HAS_BIAS, SOFTPLUS)
        # a_{t+1} inside the chunk; 1 in its last column, where the carry already holds a_{t0+T} G_{t0+T}
        _, dt_n, _ = _load_step(u_ptr, dlt_ptr, bias, io + 1,
                                cmask[:, None] & ((ts < CHUNK - 1) & (t + 1 < L))[None, :], HAS_BIAS, SOFTPLUS)
        dy = tl.load(dout_ptr + io, mask=iomask, other=0.0).to(tl.float32)
        if HAS_Z:
            zz = tl.load(z_ptr + io, mask=iomask, other=0.0).to(tl.float32)
            sig = 1.0 / (1.0 + tl.exp(-zz))
            y = tl.sum(states * Ct, axis=1)
            if HAS_D:
                y += Dv * uu
            tl.store(dz_ptr + io, (dy * y * sig * (1.0 + zz * (1.0 - sig))).to(dz_ptr.dtype.element_ty), mask=iomask)
            dy = dy * zz * sig
        ga, gb = _reverse_linear_scan(tl.exp(dt_n[:, None, :] * A3), dy[:, None, :] * Ct, REVERSE_BY_FLIP)
        G = ga * carry[:, :, None] + gb
        # Masked channels and steps have u = dy = 0 and zero states, so they add nothing to these sums.
        tl.store(dC_ptr + part_rows[:, None] + t[None, :], tl.sum(dy[:, None, :] * states, axis=0), mask=nt_mask)
        tl.store(dB_ptr + part_rows[:, None] + t[None, :], tl.sum(G * (dt * uu)[:, None, :], axis=0), mask=nt_mask)
        gB_sum = tl.sum(G * Bt, axis=1)
        decay_grad = G * a * prev  # dLoss/d(dt A) per state and step
        du = dt * gB_sum
        if HAS_D:
            du += dy * Dv
            dD_acc += tl.sum(dy * uu, axis=1)
        # Steps past L carry G (the carry) but no step: their ddt must not reach dbias.
        ddt = tl.where(iomask, (uu * gB_sum + tl.sum(decay_grad * A3, axis=1)) * ddt_draw, 0.0)
        dA_acc += tl.sum(decay_grad * dt[:, None, :], axis=2)
        dbias_acc += tl.sum(ddt, axis=1)
        tl.store(du_ptr + io, du.to(du_ptr.dtype.element_ty), mask=iomask)
        tl.store(ddlt_ptr + io, ddt.to(ddlt_ptr.dtype.element_ty), mask=iomask)
        carry = tl.sum(tl.where(ts[None, None, :] == 0, a * G, 0.0), axis=2)
    tl.store(dA_ptr + pid_b * d * n + state_off, dA_acc, mask=smask)
    if HAS_D:
        tl.store(dD_ptr + pid_b * d + ch, dD_acc, mask=cmask)
    if HAS_BIAS:
        tl.store(dbias_ptr + pid_b * d + ch, dbias_acc, mask=cmask)


def _group_sizes(X: Tensor, d: int):
    """(groups, channels per group) of B or C."""
    g = X.shape[1] if X.dim() == 4 else 1
    return g, d // g


def _scan_fwd_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, cfg: Optional[ScanKernelConfig] = None):
    """``cfg``: ``_config_for``'s by default (bench/tune.py times others; the backward must get the
    same ``chunk``, the checkpoints' spacing)."""
    b, d, l = u.shape
    n = A.shape[1]
    cfg = cfg or _config_for(u, B, C, n)
    (gB, per_gB), (gC, per_gC) = _group_sizes(B, d), _group_sizes(C, d)
    n_chunks = triton.cdiv(l, cfg.chunk)
    out = torch.empty_like(u)
    last = u.new_empty(b, d, n, dtype=torch.float32)
    ckpt = u.new_empty(b, n_chunks, d, n, dtype=torch.float32)
    _scan_fwd_kernel[(b, triton.cdiv(d, cfg.block_d))](
        u, delta, A, B, C, D if D is not None else u, z if z is not None else u,
        delta_bias if delta_bias is not None else u, out, last, ckpt,
        d, l, n, gB, gC, per_gB, per_gC, n_chunks,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        BLOCK_D=cfg.block_d, BLOCK_N=cfg.block_n, CHUNK=cfg.chunk, num_warps=cfg.fwd_warps)
    return out, last, ckpt


def _scan_bwd_triton(dout, dlast, u, delta, A, B, C, D, z, delta_bias, ckpt, delta_softplus,
                     cfg: Optional[ScanKernelConfig] = None):
    b, d, l = u.shape
    n = A.shape[1]
    cfg = cfg or _config_for(u, B, C, n)
    (gB, per_gB), (gC, per_gC) = _group_sizes(B, d), _group_sizes(C, d)
    n_chunks = ckpt.shape[1]
    n_blocks = triton.cdiv(d, cfg.block_d)
    f32 = dict(dtype=torch.float32, device=u.device)
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else u.new_empty(0)
    dA_part = torch.empty(b, d, n, **f32)
    dD_part = torch.empty(b, d, **f32)
    dbias_part = torch.empty(b, d, **f32)
    dB_part = torch.empty(b, n_blocks, n, l, **f32)
    dC_part = torch.empty(b, n_blocks, n, l, **f32)
    _scan_bwd_kernel[(b, n_blocks)](
        u, delta, A, B, C, D if D is not None else u, z if z is not None else u,
        delta_bias if delta_bias is not None else u, ckpt, dout, dlast if dlast is not None else u,
        du, ddelta, dz, dA_part, dD_part, dbias_part, dB_part, dC_part,
        d, l, n, gB, gC, per_gB, per_gC, n_chunks, n_blocks,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        HAS_DLAST=dlast is not None, BLOCK_D=cfg.block_d, BLOCK_N=cfg.block_n, CHUNK=cfg.chunk,
        REVERSE_BY_FLIP=REVERSE_SCAN == "flip", num_warps=cfg.bwd_warps)

    def per_group(part: Tensor, X: Tensor) -> Tensor:
        # blocks never straddle groups, so each group's blocks are consecutive
        if X.dim() == 3:
            return part.sum(1).to(X.dtype)
        return part.view(b, X.shape[1], -1, n, l).sum(2).to(X.dtype)

    dB, dC = per_group(dB_part, B), per_group(dC_part, C)
    dA = dA_part.sum(0).to(A.dtype)
    dD = dD_part.sum(0).to(D.dtype) if D is not None else u.new_empty(0)
    dbias = dbias_part.sum(0).to(delta_bias.dtype) if delta_bias is not None else u.new_empty(0)
    return du, ddelta, dA, dB, dC, dD, dz, dbias


# --------------------------------------------------------------------------------------------
# Native CPU path (csrc/selective_scan_cpu.c through ctypes)
# --------------------------------------------------------------------------------------------
NATIVE_CHUNK = 64  # steps per checkpoint: the backward's per-thread buffer is (NATIVE_CHUNK + 1, n)


class _ScanShape(ctypes.Structure):
    _fields_ = [(f, ctypes.c_int64) for f in ("b", "d", "l", "n", "gB", "gC", "chunk", "nck")] + \
               [(f, ctypes.c_int) for f in ("has_D", "has_z", "has_bias", "softplus")]


@torch.compiler.assume_constant_result
def native_scan_ready() -> bool:
    """Whether the C scan is built (or builds now) on this machine; constant for torch.compile."""
    return _native.load("selective_scan_cpu") is not None


def _native_shape(u, A, B, C, D, z, delta_bias, delta_softplus) -> _ScanShape:
    b, d, l = u.shape
    return _ScanShape(b, d, l, A.shape[1], _group_sizes(B, d)[0], _group_sizes(C, d)[0], NATIVE_CHUNK,
                      -(-l // NATIVE_CHUNK), D is not None, z is not None, delta_bias is not None,
                      delta_softplus)


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.to(torch.float32).contiguous()


def _state_minor(X: Tensor, l: int) -> Tensor:
    """B or C, (b, n, l) or (b, g, n, l) -> (b, g, l, n) float32: one step's states adjacent."""
    b, g, n = X.shape[0], X.shape[1] if X.dim() == 4 else 1, X.shape[-2]
    return X.reshape(b, g, n, l).transpose(-1, -2).to(torch.float32).contiguous()


def _native_inputs(u, delta, A, B, C, D, z, delta_bias, *extra) -> list:
    """The arguments both C entry points read, in their order: float32, contiguous, B and C state-minor;
    ``extra`` tensors (or None) follow. Kept in a list so every copy outlives the call."""
    l = u.shape[2]
    return [_f32(t) for t in (u, delta, A)] + [_state_minor(B, l), _state_minor(C, l)] + \
           [_f32(t) for t in (D, z, delta_bias, *extra)]


def _scan_fwd_native(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    shape = _native_shape(u, A, B, C, D, z, delta_bias, delta_softplus)
    b, d, l, n = shape.b, shape.d, shape.l, shape.n
    ins = _native_inputs(u, delta, A, B, C, D, z, delta_bias)
    out = torch.empty(b, d, l)
    last, ckpt = torch.empty(b, d, n), torch.empty(b, shape.nck, d, n)
    _native.load("selective_scan_cpu").scan_fwd(
        ctypes.byref(shape), ctypes.c_int(torch.get_num_threads()), *map(_native.ptr, ins + [out, last, ckpt]))
    return out.to(u.dtype), last, ckpt


def _scan_bwd_native(dout, dlast, u, delta, A, B, C, D, z, delta_bias, ckpt, delta_softplus):
    shape = _native_shape(u, A, B, C, D, z, delta_bias, delta_softplus)
    b, d, l, n = shape.b, shape.d, shape.l, shape.n
    threads = torch.get_num_threads()
    ins = _native_inputs(u, delta, A, B, C, D, z, delta_bias, ckpt, dout, dlast)
    du, ddelta = torch.empty(b, d, l), torch.empty(b, d, l)
    dz = torch.empty(b, d, l) if z is not None else None
    dA_part, dD_part, dbias_part = torch.empty(b, d, n), torch.empty(b, d), torch.empty(b, d)
    # Per-thread partial sums of the gradients every channel of a group adds to.
    dB_part, dC_part = torch.zeros(threads, b, shape.gB, l, n), torch.zeros(threads, b, shape.gC, l, n)
    _native.load("selective_scan_cpu").scan_bwd(
        ctypes.byref(shape), ctypes.c_int(threads),
        *map(_native.ptr, ins + [du, ddelta, dz, dA_part, dD_part, dbias_part, dB_part, dC_part]))

    def per_group(part: Tensor, X: Tensor) -> Tensor:
        return part.sum(0).transpose(-1, -2).reshape(X.shape).to(X.dtype).contiguous()

    return (du.to(u.dtype), ddelta.to(delta.dtype), dA_part.sum(0).to(A.dtype), per_group(dB_part, B),
            per_group(dC_part, C), dD_part.sum(0).to(D.dtype) if D is not None else u.new_empty(0),
            dz.to(z.dtype) if z is not None else u.new_empty(0),
            dbias_part.sum(0).to(delta_bias.dtype) if delta_bias is not None else u.new_empty(0))


# --------------------------------------------------------------------------------------------
# Custom ops (torch.compile / torch.export see them as single nodes)
# --------------------------------------------------------------------------------------------
def _checkpoint_chunk(impl: str, u: Tensor, B: Tensor, C: Tensor, n: int) -> int:
    return NATIVE_CHUNK if impl == "native" else _config_for(u, B, C, n).chunk


@torch.library.custom_op("m2restore_kernels::selective_scan", mutates_args=())
def _scan_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
             delta_bias: Optional[Tensor], delta_softplus: bool, impl: str) -> tuple[Tensor, Tensor, Tensor]:
    """Forward of the fused kernels (``impl`` "triton" or "native") -> (out (b, d, l), last state
    (b, d, n) f32, checkpoints (b, chunks, d, n) f32)."""
    fwd = _scan_fwd_native if impl == "native" else _scan_fwd_triton
    return fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


@_scan_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, impl):
    b, d, l = u.shape
    n = A.shape[1]
    n_chunks = -(-l // _checkpoint_chunk(impl, u, B, C, n))
    return (torch.empty_like(u), u.new_empty(b, d, n, dtype=torch.float32),
            u.new_empty(b, n_chunks, d, n, dtype=torch.float32))


@torch.library.custom_op("m2restore_kernels::selective_scan_bwd", mutates_args=())
def _scan_bwd_op(dout: Tensor, dlast: Optional[Tensor], u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                 D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor], ckpt: Tensor,
                 delta_softplus: bool, impl: str
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> du, ddelta, dA, dB, dC, dD, dz, ddelta_bias (empty where the input is None)."""
    bwd = _scan_bwd_native if impl == "native" else _scan_bwd_triton
    return bwd(dout.contiguous(), None if dlast is None else dlast.contiguous(), u, delta, A, B, C, D,
               z, delta_bias, ckpt, delta_softplus)


@_scan_bwd_op.register_fake
def _(dout, dlast, u, delta, A, B, C, D, z, delta_bias, ckpt, delta_softplus, impl):
    def like(x):
        return torch.empty_like(x) if x is not None else u.new_empty(0)

    return (torch.empty_like(u), torch.empty_like(delta), torch.empty_like(A), torch.empty_like(B),
            torch.empty_like(C), like(D), like(z), like(delta_bias))


def _scan_setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, impl = inputs
    ctx.delta_softplus, ctx.impl = delta_softplus, impl
    ctx.present = (D is not None, z is not None, delta_bias is not None)
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2])


def _scan_backward(ctx, dout, dlast, _dckpt):
    u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, dz, dbias = _scan_bwd_op(dout, dlast, u, delta, A, B, C, D, z, delta_bias, ckpt,
                                                         ctx.delta_softplus, ctx.impl)
    has_D, has_z, has_bias = ctx.present
    return (du, ddelta, dA, dB, dC, dD if has_D else None, dz if has_z else None, dbias if has_bias else None,
            None, None)


_scan_op.register_autograd(_scan_backward, setup_context=_scan_setup_context)


# --------------------------------------------------------------------------------------------
# Public entry
# --------------------------------------------------------------------------------------------
MAMBA_SELECTIVE_SCAN_FN = ("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn")


def _torch_path_impl(u: Tensor, delta: Tensor) -> str:
    """The implementation behind ``backend="torch"``: the fused C loop for CPU tensors computed in
    float32 where it builds, else the chunked PyTorch scan (float64, other devices, no compiler)."""
    if u.device.type == "cpu" and delta.dtype != torch.float64 and native_scan_ready():
        return "native"
    return "chunked"


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, backend: str = "auto"):
    """Mamba's selective scan; mamba_ssm ``selective_scan_fn`` semantics (see the module docstring).

    u, delta, z: (b, d, l); A: (d, n) real; B, C: (b, n, l) or (b, g, n, l); D, delta_bias: (d,).
    Any float dtype; the recurrence runs in float32 (float64 for float64 inputs on the torch path).
    Returns out (b, d, l) in u's dtype, plus with ``return_last_state`` the last state (b, d, n) in
    that compute dtype. Gradients reach every floating input (and flow from the last state).
    ``backend``: "auto" (mamba_ssm's kernel on CUDA when installed, else Triton where it runs, else
    PyTorch), "triton" or "torch".
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    path = resolve_backend(backend, u.device)
    package_fn = extension_op(backend, u.device, *MAMBA_SELECTIVE_SCAN_FN)
    if package_fn is not None:
        # mamba_ssm wants A, D and delta_bias in float32 (casts are differentiable)
        return package_fn(
            u, delta, A.float(), B, C, None if D is None else D.float(), z,
            None if delta_bias is None else delta_bias.float(), delta_softplus, return_last_state)
    impl = "triton" if path == "triton" else _torch_path_impl(u, delta)
    if impl != "chunked":
        args = [None if t is None else t.contiguous() for t in (u, delta, A, B, C, D, z, delta_bias)]
        out, last, _ = _scan_op(*args, delta_softplus, impl)
    else:
        out, last = _selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (out, last) if return_last_state else out
