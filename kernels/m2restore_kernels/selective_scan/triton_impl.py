"""Triton path of the selective scan.

One program per (batch, group, block of channels) keeps its (BLOCK_D, d_state) states in registers
and walks the sequence a chunk of CHUNK steps at a time. A chunk's inputs load as contiguous
(channels, steps) tiles and its steps x -> a_t x + b_t compose in a parallel scan
(``tl.associative_scan``); the state entering the chunk applies through the cumulative decay, and
the forward keeps it as the chunk's checkpoint. The backward walks the chunks in reverse: it
recomputes the chunk's states (and, by the same scan over steps shifted by one, the states before
each step) from the checkpoint, then gets the adjoint dLoss/dx_t of every step from one reverse
scan of G_t = C_t dy_t + a_{t+1} G_{t+1}. Cross-channel gradients (B, C) and cross-batch ones
(A, D, delta_bias) are written as per-program partial sums and reduced in PyTorch, so results are
deterministic. Time-invariant B and C, (d, n), load like A (constexprs VAR_B, VAR_C pick the form)
and their gradients sum over steps in the program, per batch like dA. Real A, float32 compute.

Public but advanced (``m2restore_kernels.tuning``): :class:`LaunchConfig`, :func:`default_config`,
:func:`selective_scan_fwd` and :func:`selective_scan_bwd` with ``config=``, ``KERNELS``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .._triton import jit, tl, triton
from .reference import group_sizes

# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------
# Steps per chunk, a power of two (a tile dimension): short sequences get MIN_CHUNK, long ones
# MAX_CHUNK, which keeps the (block_d, block_n, chunk) scan tiles in registers.
MIN_CHUNK, MAX_CHUNK = 16, 64
MIN_TILE = 2  # d_state = 1 would otherwise give a one-wide tile


@dataclass(frozen=True)
class LaunchConfig:
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


def default_config(d: int, l: int, n: int, channels_per_group: tuple, device: torch.device) -> LaunchConfig:
    """For d channels, l steps, n states; ``channels_per_group`` of the grouped ones among B and C."""
    # A program must not straddle two groups of B or C: block_d divides every group's channel count.
    cap = math.gcd(*channels_per_group) if channels_per_group else triton.next_power_of_2(d)
    cap &= -cap  # its largest power-of-two divisor
    block_n = max(MIN_TILE, triton.next_power_of_2(n))
    chunk = min(MAX_CHUNK, max(MIN_CHUNK, triton.next_power_of_2(l)))
    if device.type != "cuda":
        # The interpreter runs programs one after another at a fixed cost per step: few, wide programs.
        return LaunchConfig(min(cap, 64, triton.next_power_of_2(d)), block_n, chunk, fwd_warps=1, bwd_warps=1)
    # Across programs the parallelism is batch x channel blocks: narrow blocks give enough programs
    # for the SMs. The (block_d, block_n, chunk) scan tiles (4 x 16 x 64 float32 pairs) spread over
    # four warps in the forward and eight in the backward, which keeps about three times as many
    # such tiles live. bench/tune.py times the alternatives.
    return LaunchConfig(min(cap, 4, triton.next_power_of_2(d)), block_n, chunk, fwd_warps=4, bwd_warps=8)


def config_for(u: Tensor, B: Tensor, C: Tensor, n: int) -> LaunchConfig:
    """:func:`default_config` for these tensors."""
    d = u.shape[1]
    return default_config(d, u.shape[2], n, tuple(d // X.shape[1] for X in (B, C) if X.dim() == 4), u.device)


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
# combine reversed. The CUDA parity tests run both forms and this picks the one the package uses;
# the interpreter computes both exactly.
REVERSE_SCAN = "native"


@jit
def _reverse_linear_scan(a, b, BY_FLIP: tl.constexpr):
    """Along axis 2, (a_t, b_t) composed with every later step: the adjoint's suffix scan."""
    if BY_FLIP:
        ra, rb = tl.associative_scan((tl.flip(a, 2), tl.flip(b, 2)), 2, _linear_recurrence)
        return tl.flip(ra, 2), tl.flip(rb, 2)
    return tl.associative_scan((a, b), 2, _linear_recurrence, reverse=True)


@jit
def _bc_rows(X_ptr, pid_b, c0, per_g, g, L, n, ns, state_off, VARIABLE: tl.constexpr):
    """Pointers to a program's rows of B or C: time-varying (b, g, n, L), its group's first steps
    (BLOCK_N,); time-invariant (d, n), its channels' rows (BLOCK_D, BLOCK_N)."""
    # one return after a compile-time branch: the compiler rejects returns of two shapes
    if VARIABLE:
        rows = X_ptr + (pid_b * g + c0 // per_g) * n * L + ns * L
    else:
        rows = X_ptr + state_off
    return rows


@jit
def _load_bc(rows, t, cmask, nmask, tmask, VARIABLE: tl.constexpr):
    """B or C at the steps t (CHUNK,), float32: time-varying (1, BLOCK_N, CHUNK), time-invariant
    (BLOCK_D, BLOCK_N, 1); both broadcast against the (BLOCK_D, BLOCK_N, CHUNK) states."""
    if VARIABLE:
        X = tl.load(rows[:, None] + t[None, :], mask=nmask[:, None] & tmask[None, :], other=0.0).to(tl.float32)
        X = X[None, :, :]
    else:
        X = tl.load(rows, mask=cmask[:, None] & nmask[None, :], other=0.0).to(tl.float32)[:, :, None]
    return X


@jit
def _program_setup(A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, pid_b, pid_d, d, L, n, gB, gC, per_gB, per_gC,
                   HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, VAR_B: tl.constexpr, VAR_C: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """What both kernels know of program (batch pid_b, channel block pid_d): its channels and states
    with their masks, A (BLOCK_D, BLOCK_N), delta_bias and D as (BLOCK_D, 1) columns (0.0 if absent),
    the offsets of its rows of (b, d, L) tensors and the pointers of its B and C rows (``_bc_rows``)."""
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
    b_rows = _bc_rows(B_ptr, pid_b, c0, per_gB, gB, L, n, ns, state_off, VAR_B)
    c_rows = _bc_rows(C_ptr, pid_b, c0, per_gC, gC, L, n, ns, state_off, VAR_C)
    return ch, ns, cmask, nmask, smask, state_off, A, bias, Dv, rows, b_rows, c_rows


@jit
def _chunk_states(u_ptr, dlt_ptr, b_rows, bias, A, h0, io, t, cmask, nmask, tmask,
                  HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, VAR_B: tl.constexpr):
    """The states after each of a chunk's steps, (BLOCK_D, BLOCK_N, CHUNK), from the state h0
    (BLOCK_D, BLOCK_N) entering it: the steps x -> a_t x + b_t compose in one parallel scan and h0
    applies through their cumulative decay. ``io`` (BLOCK_D, CHUNK) and ``t`` (CHUNK,) address the
    steps, ``tmask`` (CHUNK,) keeps them; the others are identities. Also returns u, delta',
    d(delta')/d(delta) (BLOCK_D, CHUNK), B (``_load_bc``) and the decays a. The forward and
    the backward's recomputation share it, so they agree to the last bit."""
    uu, dt, ddt_draw = _load_step(u_ptr, dlt_ptr, bias, io, cmask[:, None] & tmask[None, :], HAS_BIAS, SOFTPLUS)
    Bt = _load_bc(b_rows, t, cmask, nmask, tmask, VAR_B)
    a = tl.exp(dt[:, None, :] * A[:, :, None])
    decay, inject = tl.associative_scan((a, (dt * uu)[:, None, :] * Bt), 2, _linear_recurrence)
    return uu, dt, ddt_draw, Bt, a, decay * h0[:, :, None] + inject


@jit
def _selective_scan_fwd_kernel(u_ptr, dlt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, last_ptr, ckpt_ptr,
                     d, L, n, gB, gC, per_gB, per_gC, n_chunks,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                     VAR_B: tl.constexpr, VAR_C: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    """Chunks of CHUNK steps in order, each as a whole: its (BLOCK_D, CHUNK) rows of u, delta, z and
    (BLOCK_N, CHUNK) of B, C load as contiguous tiles, and the CHUNK steps of x_t = a_t x_{t-1} + b_t
    compose in a parallel scan over (BLOCK_D, BLOCK_N, CHUNK); the state entering the chunk then
    applies through the scan's cumulative decay. A step-by-step loop instead waits on scattered
    loads at every step."""
    pid_b = tl.program_id(0)
    ch, ns, cmask, nmask, smask, state_off, A, bias, Dv, rows, b_rows, c_rows = _program_setup(
        A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, pid_b, tl.program_id(1), d, L, n, gB, gC, per_gB, per_gC,
        HAS_D, HAS_BIAS, VAR_B, VAR_C, BLOCK_D, BLOCK_N)
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
                                               HAS_BIAS, SOFTPLUS, VAR_B)
        y = tl.sum(states * _load_bc(c_rows, t, cmask, nmask, tmask, VAR_C), axis=1)
        if HAS_D:
            y += Dv * uu
        if HAS_Z:
            zz = tl.load(z_ptr + io, mask=iomask, other=0.0).to(tl.float32)
            y *= zz / (1.0 + tl.exp(-zz))
        tl.store(out_ptr + io, y.to(out_ptr.dtype.element_ty), mask=iomask)
        h = tl.sum(tl.where(ts[None, None, :] == CHUNK - 1, states, 0.0), axis=2)
    tl.store(last_ptr + pid_b * d * n + state_off, h, mask=smask)


@jit
def _selective_scan_bwd_kernel(u_ptr, dlt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, ckpt_ptr, dout_ptr, dlast_ptr,
                     du_ptr, ddlt_ptr, dz_ptr, dA_ptr, dD_ptr, dbias_ptr, dB_ptr, dC_ptr,
                     d, L, n, gB, gC, per_gB, per_gC, n_chunks, n_blocks,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                     HAS_DLAST: tl.constexpr, VAR_B: tl.constexpr, VAR_C: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
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
        HAS_D, HAS_BIAS, VAR_B, VAR_C, BLOCK_D, BLOCK_N)
    ts = tl.arange(0, CHUNK)
    A3 = A[:, :, None]
    part_rows = (pid_b * n_blocks + pid_d) * n * L + ns * L
    if HAS_DLAST:
        carry = tl.load(dlast_ptr + pid_b * d * n + state_off, mask=smask, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dB_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # time-invariant B and C: sums over steps
    dC_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
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
                                                        tmask, HAS_BIAS, SOFTPLUS, VAR_B)
        Ct = _load_bc(c_rows, t, cmask, nmask, tmask, VAR_C)
        # x_{t-1}: the scan of steps t - 1 (the chunk's first column gets the identity, so x_{t0-1} = h0)
        _, _, _, _, _, prev = _chunk_states(u_ptr, dlt_ptr, b_rows, bias, A, h0, io - 1, t - 1, cmask, nmask,
                                            (ts > 0) & tmask, HAS_BIAS, SOFTPLUS, VAR_B)
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
        if VAR_C:
            tl.store(dC_ptr + part_rows[:, None] + t[None, :], tl.sum(dy[:, None, :] * states, axis=0), mask=nt_mask)
        else:
            dC_acc += tl.sum(dy[:, None, :] * states, axis=2)
        if VAR_B:
            tl.store(dB_ptr + part_rows[:, None] + t[None, :], tl.sum(G * (dt * uu)[:, None, :], axis=0),
                     mask=nt_mask)
        else:
            dB_acc += tl.sum(G * (dt * uu)[:, None, :], axis=2)
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
    if not VAR_B:
        tl.store(dB_ptr + pid_b * d * n + state_off, dB_acc, mask=smask)
    if not VAR_C:
        tl.store(dC_ptr + pid_b * d * n + state_off, dC_acc, mask=smask)
    if HAS_D:
        tl.store(dD_ptr + pid_b * d + ch, dD_acc, mask=cmask)
    if HAS_BIAS:
        tl.store(dbias_ptr + pid_b * d + ch, dbias_acc, mask=cmask)



def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, config: Optional[LaunchConfig] = None):
    """-> (out (b, d, l) u's dtype, last state (b, d, n) float32, checkpoints (b, chunks, d, n) float32).
    ``config``: :func:`config_for`'s by default (the backward must get the same ``chunk``, the
    checkpoints' spacing)."""
    cfg = config
    b, d, l = u.shape
    n = A.shape[1]
    cfg = cfg or config_for(u, B, C, n)
    (gB, per_gB), (gC, per_gC) = group_sizes(B, d), group_sizes(C, d)
    n_chunks = triton.cdiv(l, cfg.chunk)
    out = torch.empty_like(u)
    last = u.new_empty(b, d, n, dtype=torch.float32)
    ckpt = u.new_empty(b, n_chunks, d, n, dtype=torch.float32)
    _selective_scan_fwd_kernel[(b, triton.cdiv(d, cfg.block_d))](
        u, delta, A, B, C, D if D is not None else u, z if z is not None else u,
        delta_bias if delta_bias is not None else u, out, last, ckpt,
        d, l, n, gB, gC, per_gB, per_gC, n_chunks,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        VAR_B=B.dim() > 2, VAR_C=C.dim() > 2,
        BLOCK_D=cfg.block_d, BLOCK_N=cfg.block_n, CHUNK=cfg.chunk, num_warps=cfg.fwd_warps)
    return out, last, ckpt


def selective_scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, ckpt, delta_softplus,
                       config: Optional[LaunchConfig] = None):
    """-> du, ddelta, dA, dB, dC, dD, dz, ddelta_bias (empty where the input is None), each in its
    input's dtype; ``ckpt`` from :func:`selective_scan_fwd` with the same ``config``."""
    cfg = config
    b, d, l = u.shape
    n = A.shape[1]
    cfg = cfg or config_for(u, B, C, n)
    (gB, per_gB), (gC, per_gC) = group_sizes(B, d), group_sizes(C, d)
    n_chunks = ckpt.shape[1]
    n_blocks = triton.cdiv(d, cfg.block_d)
    f32 = dict(dtype=torch.float32, device=u.device)
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else u.new_empty(0)
    dA_part = torch.empty(b, d, n, **f32)
    dD_part = torch.empty(b, d, **f32)
    dbias_part = torch.empty(b, d, **f32)
    # time-varying B, C: per channel block and step; time-invariant: per batch, like dA
    dB_part, dC_part = (torch.empty(b, n_blocks, n, l, **f32) if X.dim() > 2 else torch.empty(b, d, n, **f32)
                        for X in (B, C))
    _selective_scan_bwd_kernel[(b, n_blocks)](
        u, delta, A, B, C, D if D is not None else u, z if z is not None else u,
        delta_bias if delta_bias is not None else u, ckpt, dout, dlast if dlast is not None else u,
        du, ddelta, dz, dA_part, dD_part, dbias_part, dB_part, dC_part,
        d, l, n, gB, gC, per_gB, per_gC, n_chunks, n_blocks,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        HAS_DLAST=dlast is not None, VAR_B=B.dim() > 2, VAR_C=C.dim() > 2, BLOCK_D=cfg.block_d, BLOCK_N=cfg.block_n, CHUNK=cfg.chunk,
        REVERSE_BY_FLIP=REVERSE_SCAN == "flip", num_warps=cfg.bwd_warps)

    def per_group(part: Tensor, X: Tensor) -> Tensor:
        # blocks never straddle groups, so each group's blocks are consecutive
        if X.dim() == 2:
            return part.sum(0).to(X.dtype)
        if X.dim() == 3:
            return part.sum(1).to(X.dtype)
        return part.view(b, X.shape[1], -1, n, l).sum(2).to(X.dtype)

    dB, dC = per_group(dB_part, B), per_group(dC_part, C)
    dA = dA_part.sum(0).to(A.dtype)
    dD = dD_part.sum(0).to(D.dtype) if D is not None else u.new_empty(0)
    dbias = dbias_part.sum(0).to(delta_bias.dtype) if delta_bias is not None else u.new_empty(0)
    return du, ddelta, dA, dB, dC, dD, dz, dbias


KERNELS = {"selective_scan_fwd": _selective_scan_fwd_kernel, "selective_scan_bwd": _selective_scan_bwd_kernel}


# --------------------------------------------------------------------------------------------
# One decode step (selective_state_update)
# --------------------------------------------------------------------------------------------
# Channels per program: enough rows of (dim, d_state) states to fill a program, fewer as d_state grows.
STEP_ELEMENTS = 2048


@jit
def _state_update_kernel(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, idx_ptr, out_ptr,
                         p, n, heads_per_group,
                         s_row, s_h, s_p, s_n, x_b, x_h, x_p, dt_b, dt_h, dt_p, a_h, a_p, a_n,
                         b_b, b_g, b_n, c_b, c_g, c_n, d_h, d_p, z_b, z_h, z_p, bias_h, bias_p, o_b, o_h, o_p,
                         SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                         HAS_BIAS: tl.constexpr, HAS_IDX: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (block of channels, batch row, head): state rows (BLOCK_P, BLOCK_N) in float32,
    state <- exp(dt' A) state + dt' B x stored back in the state's dtype, out = (C . state + D x) silu(z).
    A padding row (negative state index) writes zeros to out and nothing to the state."""
    pid_p, pid_b, pid_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    pmask = offs_p < p
    nmask = offs_n < n
    if HAS_IDX:
        row = tl.load(idx_ptr + pid_b).to(tl.int64)
    else:
        row = pid_b.to(tl.int64)
    real = row >= 0
    row = tl.maximum(row, 0)
    smask = pmask[:, None] & nmask[None, :] & real
    s_ptrs = state_ptr + row * s_row + pid_h * s_h + offs_p[:, None] * s_p + offs_n[None, :] * s_n
    state = tl.load(s_ptrs, mask=smask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + pid_b * x_b + pid_h * x_h + offs_p * x_p, mask=pmask, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + pid_b * dt_b + pid_h * dt_h + offs_p * dt_p, mask=pmask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + pid_h * bias_h + offs_p * bias_p, mask=pmask, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    A = tl.load(A_ptr + pid_h * a_h + offs_p[:, None] * a_p + offs_n[None, :] * a_n,
                mask=pmask[:, None] & nmask[None, :], other=0.0).to(tl.float32)
    grp = pid_h // heads_per_group
    Bv = tl.load(B_ptr + pid_b * b_b + grp * b_g + offs_n * b_n, mask=nmask, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + pid_b * c_b + grp * c_g + offs_n * c_n, mask=nmask, other=0.0).to(tl.float32)
    state = tl.exp(dt[:, None] * A) * state + (dt * x)[:, None] * Bv[None, :]
    tl.store(s_ptrs, state.to(state_ptr.dtype.element_ty), mask=smask)
    out = tl.sum(state * Cv[None, :], axis=1)
    if HAS_D:
        out += x * tl.load(D_ptr + pid_h * d_h + offs_p * d_p, mask=pmask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + pid_b * z_b + pid_h * z_h + offs_p * z_p, mask=pmask, other=0.0).to(tl.float32)
        out *= z * tl.sigmoid(z)
    out = tl.where(real, out, 0.0)
    tl.store(out_ptr + pid_b * o_b + pid_h * o_h + offs_p * o_p, out.to(out_ptr.dtype.element_ty), mask=pmask)


def selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices) -> Tensor:
    """One step on the multi-head form (see ``reference.selective_state_update_ref``), state in place;
    any strides. -> out (b, h, p) in x's dtype."""
    b, h, p = x.shape
    n = A.shape[-1]
    block_n = max(MIN_TILE, triton.next_power_of_2(n))
    block_p = max(1, min(triton.next_power_of_2(p), STEP_ELEMENTS // block_n))
    out = torch.empty_like(x)

    def strides(t, k):
        return t.stride() if t is not None else (0,) * k

    _state_update_kernel[(triton.cdiv(p, block_p), b, h)](
        state, x, dt, A, B, C, D if D is not None else x, z if z is not None else x,
        dt_bias if dt_bias is not None else x, state_batch_indices if state_batch_indices is not None else x, out,
        p, n, h // B.shape[1],
        *state.stride(), *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(), *strides(D, 2),
        *strides(z, 3), *strides(dt_bias, 2), *out.stride(),
        SOFTPLUS=dt_softplus, HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
        HAS_IDX=state_batch_indices is not None, BLOCK_P=block_p, BLOCK_N=block_n)
    return out
