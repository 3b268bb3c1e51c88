"""Triton path of the MoE ops: top-K routing, the dispatch plan (a counting sort), the expert
MLP kernels and the K-way combination, with their launch configurations.

Forward: a program takes BLOCK_M sorted rows of one expert (found from the plan's N + 1 segment
offsets, no block table), gathers their x rows, and walks the hidden width in BLOCK_H chunks:
GEMM1 (+b1), exact GELU, GEMM2 into a (BLOCK_M, C) accumulator, so the hidden activation never
leaves registers. The backward recomputes it: one kernel for dx (same grid as the forward), one
for the weight gradients (grid experts x hidden chunks x row splits, partial sums reduced on the
host side so the result is deterministic).

Public but advanced (``m2restore_kernels.tuning``): :class:`LaunchConfig`, :func:`default_config`,
:func:`moe_mlp_fwd` and :func:`moe_mlp_bwd` with ``config=``, :func:`combine_block_p`,
:func:`block_n` and ``KERNELS``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .._triton import dot_precision, gelu, gelu_grad, jit, tl, triton
from .reference import GATED_ACTIVATIONS

# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes of the expert kernels (powers of two, every ``tl.dot`` dimension >= 16).

    ``block_c`` covers the whole channel width (the GEMM2 accumulator is (block_m, block_c));
    ``dw_split`` splits each expert's rows over that many weight-gradient programs;
    ``num_stages`` is the software-pipelining depth of the loops over hidden chunks or rows.
    """
    block_m: int
    block_h: int
    block_c: int
    num_warps: int
    dw_split: int
    num_stages: int = 3  # Triton's default on NVIDIA

    def launch_args(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_C=self.block_c, BLOCK_H=self.block_h,
                    num_warps=self.num_warps, num_stages=self.num_stages)


MIN_DOT = 16  # tl.dot's smallest operand dimension on NVIDIA
MIN_TILE = 2  # N = 1 or K = 1 would otherwise give a one-wide tile


def pow2_at_least(n: int, floor: int) -> int:
    """The tile width for n elements: the next power of two, at least ``floor``."""
    return max(floor, triton.next_power_of_2(n))


def _per_device(device: torch.device, interpreter: int, cuda: int) -> int:
    # The interpreter runs programs one after another at a fixed cost each, so CPU tensors get few,
    # big programs; a GPU gets register-sized tiles and many programs.
    return cuda if device.type == "cuda" else interpreter


# Weight-gradient programs each sum about this many row blocks, so the GPU still sees hundreds of
# programs; at most MAX_DW_SPLIT partial buffers per expert are reduced afterwards.
DW_BLOCKS_PER_PROGRAM = 8
MAX_DW_SPLIT = 64
# Blocks allowed less shared memory than this (an RTX 3090 or 4090: 99 KiB) take the float32
# fallback tiles at wide channel counts.
LARGE_SHARED_MEMORY = 160 * 1024


@functools.lru_cache(maxsize=None)
def _shared_memory_per_block(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def default_config(n_assign: int, n_experts: int, C: int, Hd: int, device: torch.device, dtype: torch.dtype,
                 shared_memory: Optional[int] = None, backward: bool = False) -> LaunchConfig:
    """Tiles for the expert kernels on ``device`` (the forward's, or with ``backward`` the dx and
    weight-gradient kernels'); ``shared_memory`` (bytes one block may use) defaults to the CUDA
    device's own."""
    block_c = pow2_at_least(C, MIN_DOT)
    if device.type != "cuda":
        # The interpreter runs programs one after another at a fixed cost each: few, big programs.
        return LaunchConfig(block_m=128, block_h=min(128, pow2_at_least(Hd, MIN_DOT)), block_c=block_c,
                             num_warps=4, dw_split=1)
    # Registers hold the x tile and the (block_m, block_c) float32 accumulator plus one hidden chunk
    # of w1 and w2: 32 hidden units per step, eight warps, two pipeline stages. Rows per tile: as many
    # as fit without spilling (compiled for sm_90, bench/compile_check.py: ptxas's register and spill
    # counts), because every tile streams its expert's whole w1 and w2 through the SM: with 32-row
    # tiles the first DDER of a 512x512 image (524,288 assignments, 24 KB of bf16 weights per expert)
    # would re-read 390 MB of weights from L2, against 100-150 MB of activations from DRAM; 128-row
    # tiles cut that to 100 MB. Spill-free in 16-bit: 128 rows at 48 channels (64 in the backward,
    # whose weight-gradient kernel also holds dout and two gradient tiles), 64 at 96 (32), 32 at 192
    # (16). float32 takes 16 rows everywhere (its 3xTF32 dots hold three times the operands): none
    # spilled at 48 channels, up to 1.7 KiB at 192, within 163,968 B of shared memory (an A100 allows
    # 166,912). bench/tune.py times the alternatives.
    if dtype == torch.float32:
        block_m = 16
    else:
        block_m = 128 if block_c <= 64 else 64 if block_c <= 128 else 32
        block_m = block_m // 2 if backward else block_m
    block_h, num_stages = min(32, pow2_at_least(Hd, MIN_DOT)), 2
    small_shared = (shared_memory or _shared_memory_per_block(device)) < LARGE_SHARED_MEMORY
    if dtype == torch.float32 and block_c > 128 and small_shared:
        # 192 float32 channels took up to 164 KB per block: over the 99 KiB of an RTX 3090 or 4090.
        # Half-width hidden chunks in a single stage need at most 96 KiB (compiled for sm_86).
        block_h, num_stages = 16, 1
    rows_per_expert = max(1, n_assign // max(1, n_experts))
    dw_split = max(1, min(MAX_DW_SPLIT, rows_per_expert // (DW_BLOCKS_PER_PROGRAM * block_m)))
    return LaunchConfig(block_m=block_m, block_h=block_h, block_c=block_c, num_warps=8, dw_split=dw_split,
                         num_stages=num_stages)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
@jit
def _order_key(x):
    """float32 -> int32 keys that compare as the floats do, with -0.0 equal to 0.0 and every NaN
    (either sign) above +inf: ``topk_softmax``'s order without a float comparison (a GPU's max
    drops NaN operands, the interpreter's propagates them)."""
    b = x.to(tl.int32, bitcast=True)
    mag = b & 0x7FFFFFFF
    key = tl.where(b >= 0, b, b ^ 0x7FFFFFFF)
    key = tl.where(mag == 0, 0, key)
    return tl.where(mag > 0x7F800000, 0x7FFFFFFF, key)


@jit
def _key_value(key):
    """The float32 of an ``_order_key`` (a NaN for the NaN key, 0.0 for -0.0)."""
    return tl.where(key >= 0, key, key ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@jit
def _finite(x):
    return (x.to(tl.int32, bitcast=True) & 0x7F800000) != 0x7F800000


@jit
def _topk_softmax_fwd_kernel(logits_ptr, w_ptr, idx_ptr, P, N,
                             K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.arange(0, BLOCK_N)
    slots = tl.arange(0, BLOCK_K)
    rmask = rows < P
    free = rmask[:, None] & (cols[None, :] < N)
    s = tl.load(logits_ptr + rows[:, None] * N + cols[None, :], mask=free, other=0.0).to(tl.float32)
    # Below every real key (-inf's is -2**31 + 2**23 - 1): taken and padded columns.
    none = -2147483648
    key = _order_key(s)
    top_key = tl.full((BLOCK_P, BLOCK_K), none, tl.int32)
    top_i = tl.zeros((BLOCK_P, BLOCK_K), tl.int32)
    # K rounds of "take the max": the lowest column holding the max wins, which settles ties. The
    # keys are totally ordered and N >= K, so each round takes a distinct real column.
    for k in tl.static_range(K):
        cand = tl.where(free, key, none)
        m = tl.max(cand, axis=1)
        i = tl.min(tl.where(free & (cand == m[:, None]), cols[None, :], BLOCK_N), axis=1)
        free = free & (cols[None, :] != i[:, None])
        top_key = tl.where(slots[None, :] == k, m[:, None], top_key)
        top_i = tl.where(slots[None, :] == k, i[:, None], top_i)
    kept = slots[None, :] < K
    # torch.softmax's answer without computing on infinities: slot 0 holds the row max; a NaN or
    # +inf there (they rank highest) or a -inf (every kept logit is -inf) spoils the whole row, and
    # a kept -inf below a finite max gets weight 0. Rows past P hold zeros.
    top_v = _key_value(top_key)
    m = _key_value(tl.max(tl.where(kept, top_key, none), axis=1))
    bad = ~_finite(m)
    m = tl.where(bad, 0.0, m)
    ok = kept & _finite(top_v) & ~bad[:, None]
    num = tl.where(ok, tl.exp(tl.where(ok, top_v, 0.0) - m[:, None]), 0.0)
    total = tl.where(bad, 1.0, tl.sum(num, axis=1))  # >= 1 elsewhere: slot 0 contributes exp(0)
    w = tl.where(bad[:, None], float("nan"), num / total[:, None])
    out_mask = rmask[:, None] & kept
    offs = rows[:, None] * K + slots[None, :]
    tl.store(w_ptr + offs, w.to(w_ptr.dtype.element_ty), mask=out_mask)
    tl.store(idx_ptr + offs, top_i.to(tl.int64), mask=out_mask)


@jit
def _topk_softmax_bwd_kernel(dw_ptr, w_ptr, idx_ptr, dlogits_ptr, P, N,
                             K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    slots = tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < P) & (slots[None, :] < K)
    offs = rows[:, None] * K + slots[None, :]
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(dw_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    idx = tl.load(idx_ptr + offs, mask=mask, other=0)
    d = w * (g - tl.sum(w * g, axis=1)[:, None])
    tl.store(dlogits_ptr + rows[:, None] * N + idx, d.to(dlogits_ptr.dtype.element_ty), mask=mask)


@jit
def _segment_rows(order_ptr, offsets_ptr, pid, P, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows of program ``pid`` of the row-block grid: (expert, assignment ids, their x rows, row mask).

    Expert e's segment of the sorted order is cut into ceil(count_e / BLOCK_M) blocks, experts one
    after another; the program finds its block from the N + 1 offsets alone (no block table to
    build on the host side). Programs past the last block get expert N and no rows.
    """
    n = tl.arange(0, BLOCK_N)
    lo = tl.load(offsets_ptr + n, mask=n < N, other=0)
    hi = tl.load(offsets_ptr + n + 1, mask=n < N, other=0)
    blocks = (hi - lo + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(blocks, 0)
    e = tl.sum((ends <= pid).to(tl.int32), 0)
    mine = n == e
    start = tl.sum(tl.where(mine, lo + (pid - ends + blocks) * BLOCK_M, 0), 0)
    r = start + tl.arange(0, BLOCK_M)
    rmask = r < tl.sum(tl.where(mine, hi, 0), 0)
    a = tl.load(order_ptr + r, mask=rmask, other=0)
    return e, a, a % tl.maximum(P, 1), rmask  # P = 0 (no rows at all) must not divide by zero


ACT_CODES = {"gelu": 0, "silu": 1, "relu": 2, "swiglu": 1, "geglu": 0}


@jit
def _act(x, ACT: tl.constexpr):
    """The plain activation ``ACT`` (ACT_CODES) in float32."""
    if ACT == 0:
        return gelu(x)
    elif ACT == 1:
        return x * tl.sigmoid(x)
    else:
        return tl.maximum(x, 0.0)


@jit
def _act_grad(x, ACT: tl.constexpr):
    """d act(x) / dx (ReLU's is 0 at 0, as torch's)."""
    if ACT == 0:
        return gelu_grad(x)
    elif ACT == 1:
        s = tl.sigmoid(x)
        return s * (1.0 + x * (1.0 - s))
    else:
        return (x > 0).to(tl.float32)


@jit
def _first_projection(xt, w1_e, b1_e, c, hh, cmask, hmask, HD, S1C, S1H, dt,
                      OFFSET: tl.constexpr, HAS_B1: tl.constexpr, PRECISION: tl.constexpr):
    """(w1 chunk (BLOCK_C, BLOCK_H) in dt, x @ w1 chunk + b1 chunk in float32) of the hidden
    columns hh (+ HD for OFFSET: a gated expert's up half)."""
    col = hh + OFFSET * HD
    w = tl.load(w1_e + c[:, None] * S1C + col[None, :] * S1H, mask=cmask[:, None] & hmask[None, :], other=0.0).to(dt)
    h = tl.dot(xt, w, input_precision=PRECISION)
    if HAS_B1:
        h += tl.load(b1_e + col, mask=hmask, other=0.0).to(dt).to(tl.float32)[None, :]
    return w, h


@jit
def _moe_mlp_fwd_kernel(x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr, order_ptr, offsets_ptr, P, C, HD, N,
                        S1N, S1C, S1H, S2N, S2H, S2C, SB1,
                        HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
                        BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """out[a] = act(x[a % P] @ w1[e] + b1[e]) @ w2[e] + b2[e] for BLOCK_M sorted assignments a of
    one expert e (gated: act(gate) * up, gate = hidden columns [0, HD), up = [HD, 2 HD)), in out's
    dtype (the compute dtype): x, the weights and the biases are rounded to it as they are loaded
    (exactly as if cast beforehand), so autocast needs no cast kernels and no cast copy of x; the
    dots accumulate in float32. w1 (N, C, H1) and w2 (N, HD, C) come in any strides (S1*, S2*), so
    nn.Linear's (N, H1, C) and (N, C, HD) are read where they lie."""
    e, a, tok, rmask = _segment_rows(order_ptr, offsets_ptr, tl.program_id(0), P, N, BLOCK_M, BLOCK_N)
    if e >= N:  # the grid is an upper bound on the block count
        return
    dt = out_ptr.dtype.element_ty
    c = tl.arange(0, BLOCK_C)
    cmask = c < C
    xt = tl.load(x_ptr + tok[:, None] * C + c[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0).to(dt)
    acc = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    w1_e = w1_ptr + e.to(tl.int64) * S1N
    w2_e = w2_ptr + e.to(tl.int64) * S2N
    b1_e = b1_ptr + e * SB1
    for h0 in range(0, HD, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)
        hmask = hh < HD
        _, hpre = _first_projection(xt, w1_e, b1_e, c, hh, cmask, hmask, HD, S1C, S1H, dt, 0, HAS_B1, PRECISION)
        h = _act(hpre, ACT)
        if GATED:
            _, up = _first_projection(xt, w1_e, b1_e, c, hh, cmask, hmask, HD, S1C, S1H, dt, 1, HAS_B1, PRECISION)
            h = h * up
        w2t = tl.load(w2_e + hh[:, None] * S2H + c[None, :] * S2C, mask=hmask[:, None] & cmask[None, :],
                      other=0.0).to(dt)
        # Padded hidden columns are act(0) = 0 and meet zero rows of w2: no extra masking needed.
        acc = tl.dot(h.to(dt), w2t, acc, input_precision=PRECISION)
    if HAS_B2:
        acc += tl.load(b2_ptr + e * C + c, mask=cmask, other=0.0).to(dt).to(tl.float32)[None, :]
    tl.store(out_ptr + a[:, None] * C + c[None, :], acc.to(dt), mask=rmask[:, None] & cmask[None, :])


@jit
def _hidden_grads(xt, dout, w1_e, b1_e, w2_e, c, hh, cmask, hmask, HD, S1C, S1H, S2H, S2C, dt,
                  HAS_B1: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, PRECISION: tl.constexpr):
    """For one hidden chunk: the w1 chunks (gate, up; up = gate when not GATED), the hidden activation
    h and the gradients of the first projection's gate and up columns (float32)."""
    w1g, g = _first_projection(xt, w1_e, b1_e, c, hh, cmask, hmask, HD, S1C, S1H, dt, 0, HAS_B1, PRECISION)
    w2t_t = tl.load(w2_e + hh[None, :] * S2H + c[:, None] * S2C, mask=cmask[:, None] & hmask[None, :],
                    other=0.0).to(dt)  # w2[e][chunk].T
    dh = tl.dot(dout, w2t_t, input_precision=PRECISION)
    a = _act(g, ACT)
    if GATED:
        w1u, up = _first_projection(xt, w1_e, b1_e, c, hh, cmask, hmask, HD, S1C, S1H, dt, 1, HAS_B1, PRECISION)
        return w1g, w1u, a * up, dh * up * _act_grad(g, ACT), dh * a
    return w1g, w1g, a, dh * _act_grad(g, ACT), dh


@jit
def _moe_mlp_bwd_dx_kernel(x_ptr, w1_ptr, b1_ptr, w2_ptr, dout_ptr, dxa_ptr, order_ptr, offsets_ptr, P, C, HD, N,
                           S1N, S1C, S1H, S2N, S2H, S2C, SB1,
                           HAS_B1: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
                           BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """dxa[a] = d out[a] / d x (float32), for the forward's row blocks; dots in dout's dtype."""
    e, a, tok, rmask = _segment_rows(order_ptr, offsets_ptr, tl.program_id(0), P, N, BLOCK_M, BLOCK_N)
    if e >= N:
        return
    dt = dout_ptr.dtype.element_ty
    c = tl.arange(0, BLOCK_C)
    cmask = c < C
    io_mask = rmask[:, None] & cmask[None, :]
    xt = tl.load(x_ptr + tok[:, None] * C + c[None, :], mask=io_mask, other=0.0).to(dt)
    dout = tl.load(dout_ptr + a[:, None] * C + c[None, :], mask=io_mask, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    w1_e = w1_ptr + e.to(tl.int64) * S1N
    w2_e = w2_ptr + e.to(tl.int64) * S2N
    b1_e = b1_ptr + e * SB1
    for h0 in range(0, HD, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)
        w1g, w1u, _, dg, du = _hidden_grads(xt, dout, w1_e, b1_e, w2_e, c, hh, cmask, hh < HD, HD, S1C, S1H,
                                            S2H, S2C, dt, HAS_B1, ACT, GATED, PRECISION)
        acc = tl.dot(dg.to(dt), tl.trans(w1g), acc, input_precision=PRECISION)
        if GATED:
            acc = tl.dot(du.to(dt), tl.trans(w1u), acc, input_precision=PRECISION)
    tl.store(dxa_ptr + a[:, None] * C + c[None, :], acc, mask=io_mask)


@jit
def _moe_mlp_bwd_dw_kernel(x_ptr, w1_ptr, b1_ptr, w2_ptr, dout_ptr, order_ptr, offsets_ptr,
                           dw1_ptr, db1_ptr, dw2_ptr, db2_ptr, P, C, HD, N,
                           S1N, S1C, S1H, S2N, S2H, S2C, SB1,
                           SPLIT: tl.constexpr, HAS_B1: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
                           PRECISION: tl.constexpr):
    """Program (e, hidden chunk, split s) sums row blocks s, s+SPLIT, ... of expert e into
    contiguous float32 partial buffers dw1 (SPLIT, N, C, H1), db1 (SPLIT, N, H1), dw2 (SPLIT, N, HD, C),
    db2 (SPLIT, N, C) (H1 = 2 HD gated, else HD); dots in dout's dtype."""
    dt = dout_ptr.dtype.element_ty
    e = tl.program_id(0)
    pid_h = tl.program_id(1)
    s = tl.program_id(2)
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    c = tl.arange(0, BLOCK_C)
    cmask = c < C
    hh = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = hh < HD
    w1_e = w1_ptr + e.to(tl.int64) * S1N
    w2_e = w2_ptr + e.to(tl.int64) * S2N
    b1_e = b1_ptr + e * SB1
    dw1g = tl.zeros((BLOCK_C, BLOCK_H), tl.float32)
    dw1u = tl.zeros((BLOCK_C, BLOCK_H), tl.float32)
    dw2 = tl.zeros((BLOCK_H, BLOCK_C), tl.float32)
    db1g = tl.zeros((BLOCK_H,), tl.float32)
    db1u = tl.zeros((BLOCK_H,), tl.float32)
    db2 = tl.zeros((BLOCK_C,), tl.float32)
    for r0 in range(start + s * BLOCK_M, end, SPLIT * BLOCK_M):
        r = r0 + tl.arange(0, BLOCK_M)
        rmask = r < end
        a = tl.load(order_ptr + r, mask=rmask, other=0)
        io_mask = rmask[:, None] & cmask[None, :]
        xt = tl.load(x_ptr + (a % P)[:, None] * C + c[None, :], mask=io_mask, other=0.0).to(dt)
        dout = tl.load(dout_ptr + a[:, None] * C + c[None, :], mask=io_mask, other=0.0)
        # Masked rows have act(b1) != 0 here, but their dout rows are zero, so they add nothing.
        _, _, h, dg, du = _hidden_grads(xt, dout, w1_e, b1_e, w2_e, c, hh, cmask, hmask, HD, S1C, S1H,
                                        S2H, S2C, dt, HAS_B1, ACT, GATED, PRECISION)
        dw1g = tl.dot(tl.trans(xt), dg.to(dt), dw1g, input_precision=PRECISION)
        db1g += tl.sum(dg, axis=0)
        if GATED:
            dw1u = tl.dot(tl.trans(xt), du.to(dt), dw1u, input_precision=PRECISION)
            db1u += tl.sum(du, axis=0)
        dw2 = tl.dot(tl.trans(h.to(dt)), dout, dw2, input_precision=PRECISION)
        db2 += tl.sum(dout.to(tl.float32), axis=0)
    part = s * N + e
    H1 = HD * (2 if GATED else 1)
    wmask = cmask[:, None] & hmask[None, :]
    dw1_part = dw1_ptr + part.to(tl.int64) * C * H1 + c[:, None] * H1
    tl.store(dw1_part + hh[None, :], dw1g, mask=wmask)
    tl.store(db1_ptr + part * H1 + hh, db1g, mask=hmask)
    if GATED:
        tl.store(dw1_part + HD + hh[None, :], dw1u, mask=wmask)
        tl.store(db1_ptr + part * H1 + HD + hh, db1u, mask=hmask)
    tl.store(dw2_ptr + part.to(tl.int64) * HD * C + hh[:, None] * C + c[None, :], dw2,
             mask=hmask[:, None] & cmask[None, :])
    if pid_h == 0:
        tl.store(db2_ptr + part * C + c, db2, mask=cmask)


@jit
def _combine_rows(out_ptr, w_ptr, rows, c, rmask, mask, P, C, K: tl.constexpr, LSE: tl.constexpr):
    """float32 y of ``rows``: sum_k w_k o_k, or an online log-sum-exp of o_k + log w_k."""
    for k in tl.static_range(K):
        o = tl.load(out_ptr + (k * P + rows)[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(w_ptr + rows * K + k, mask=rmask, other=1.0).to(tl.float32)[:, None]
        if LSE:
            t = o + tl.log(g)
            if k == 0:
                m = t
                acc = tl.full(t.shape, 1.0, tl.float32)
            else:
                m_new = tl.maximum(m, t)
                acc = acc * tl.exp(m - m_new) + tl.exp(t - m_new)
                m = m_new
        else:
            if k == 0:
                acc = g * o
            else:
                acc += g * o
    if LSE:
        acc = m + tl.log(acc)
    return acc


@jit
def _moe_combine_fwd_kernel(out_ptr, w_ptr, y_ptr, P, C,
                            K: tl.constexpr, LSE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.arange(0, BLOCK_C)
    rmask = rows < P
    mask = rmask[:, None] & (c[None, :] < C)
    y = _combine_rows(out_ptr, w_ptr, rows, c, rmask, mask, P, C, K, LSE)
    tl.store(y_ptr + rows[:, None] * C + c[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@jit
def _moe_combine_bwd_kernel(dy_ptr, out_ptr, w_ptr, dout_ptr, dw_ptr, P, C,
                            K: tl.constexpr, LSE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """dout[k,p] = d y[p] / d o[k,p] ((K*P, C), in out's dtype); dw[p,k] = d y[p] / d w[p,k]."""
    rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.arange(0, BLOCK_C)
    rmask = rows < P
    mask = rmask[:, None] & (c[None, :] < C)
    dy = tl.load(dy_ptr + rows[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
    if LSE:
        # y again in float32 rather than the saved (possibly half-precision) output.
        y = _combine_rows(out_ptr, w_ptr, rows, c, rmask, mask, P, C, K, LSE)
    for k in tl.static_range(K):
        offs = (k * P + rows)[:, None] * C + c[None, :]
        o = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(w_ptr + rows * K + k, mask=rmask, other=0.0).to(tl.float32)[:, None]
        if LSE:
            share = tl.where(mask, tl.exp(o - y), 0.0)  # d y / d (w o-term) without dividing by w
            tl.store(dout_ptr + offs, (dy * g * share).to(dout_ptr.dtype.element_ty), mask=mask)
            dw = tl.sum(dy * share, axis=1)
        else:
            tl.store(dout_ptr + offs, (dy * g).to(dout_ptr.dtype.element_ty), mask=mask)
            dw = tl.sum(dy * o, axis=1)
        tl.store(dw_ptr + rows * K + k, dw.to(dw_ptr.dtype.element_ty), mask=rmask)


# --------------------------------------------------------------------------------------------
# Dispatch plan: torch_impl.sort_assignments as a counting sort
# --------------------------------------------------------------------------------------------
@jit
def _tile_hits(idx_ptr, t, P, KP, N, K: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tile t's assignments a = t*BLOCK + i (a = k*P + p, indices is (P, K)) and their one-hot
    experts (BLOCK, BLOCK_N) int32. An index outside [0, N), or a past the end, matches no expert:
    unchecked bad input drops rows rather than reading or writing out of bounds."""
    a = t * BLOCK + tl.arange(0, BLOCK)
    e = tl.load(idx_ptr + (a % P) * K + a // P, mask=a < KP, other=-1)
    n = tl.arange(0, BLOCK_N)
    return a, ((e[:, None] == n[None, :]) & (n[None, :] < N)).to(tl.int32)


@jit
def _plan_count_kernel(idx_ptr, counts_ptr, P, KP, N, K: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr):
    """counts[t, e]: how many of tile t's BLOCK consecutive assignments go to expert e (int32,
    BLOCK_N columns)."""
    t = tl.program_id(0)
    _, hits = _tile_hits(idx_ptr, t, P, KP, N, K, BLOCK, BLOCK_N)
    tl.store(counts_ptr + t * BLOCK_N + tl.arange(0, BLOCK_N), tl.sum(hits, 0))


@jit
def _plan_scan_kernel(counts_ptr, base_ptr, offsets_ptr, T, N, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: offsets (N + 1,) int64, the start of each expert's segment of the sorted order
    (and its end), and base[t, e], where tile t's first assignment to expert e goes."""
    n = tl.arange(0, BLOCK_N)
    total = tl.zeros((BLOCK_N,), tl.int32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        total += tl.sum(tl.load(counts_ptr + t[:, None] * BLOCK_N + n[None, :], mask=(t < T)[:, None], other=0), 0)
    run = tl.cumsum(total, 0) - total
    tl.store(offsets_ptr + n, run.to(tl.int64), mask=n < N)
    tl.store(offsets_ptr + N, tl.sum(total, 0).to(tl.int64))
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        offs = t[:, None] * BLOCK_N + n[None, :]
        c = tl.load(counts_ptr + offs, mask=(t < T)[:, None], other=0)
        tl.store(base_ptr + offs, run[None, :] + tl.cumsum(c, 0) - c, mask=(t < T)[:, None])
        run += tl.sum(c, 0)


@jit
def _plan_scatter_kernel(idx_ptr, base_ptr, order_ptr, P, KP, N, K: tl.constexpr, BLOCK: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    """order[base[t, e] + rank] = a, rank = how many earlier assignments of tile t go to e: a stable
    counting sort, so each expert's assignments keep their order."""
    t = tl.program_id(0)
    a, hits = _tile_hits(idx_ptr, t, P, KP, N, K, BLOCK, BLOCK_N)
    rank = tl.sum((tl.cumsum(hits, 0) - 1) * hits, 1)
    base = tl.sum(tl.load(base_ptr + t * BLOCK_N + tl.arange(0, BLOCK_N))[None, :] * hits, 1)
    tl.store(order_ptr + base + rank, a.to(tl.int64), mask=tl.sum(hits, 1) > 0)


def _row_block_launch(n_assign: int, n_experts: int, cfg: LaunchConfig):
    """Grid and block arguments of the row-block kernels (forward, dx). Expert e's segment takes
    ceil(count_e / block_m) programs; n_assign // block_m + N bounds their total without reading
    the counts back to the host, and the spare programs find no rows (``_segment_rows``)."""
    return (n_assign // cfg.block_m + n_experts,), dict(BLOCK_N=pow2_at_least(n_experts, MIN_TILE), **cfg.launch_args())


PLAN_SCAN_TILES = 256  # tiles' counts the one scan program loads per step


def plan_block(device: torch.device) -> int:
    """Assignments per tile of the dispatch plan's count and scatter kernels."""
    return _per_device(device, interpreter=4096, cuda=1024)


def topk_block_p(device: torch.device, backward: bool = False) -> int:
    """Rows per program of the top-K kernels (the backward's hold no (rows, N) tile: twice as many)."""
    return _per_device(device, interpreter=1024, cuda=256 if backward else 128)


def dispatch_plan(indices: Tensor, n_experts: int, block: Optional[int] = None):
    """``torch_impl.sort_assignments`` in three Triton launches (count per tile of ``block`` assignments,
    scan, scatter): no sort library calls, no host sync, so the whole dispatch can be captured in
    a CUDA graph."""
    P, K = indices.shape
    order = torch.empty(K * P, dtype=torch.int64, device=indices.device)
    if P == 0:  # the kernels take assignment ids modulo P
        return order, torch.zeros(n_experts + 1, dtype=torch.int64, device=indices.device)
    offsets = torch.empty(n_experts + 1, dtype=torch.int64, device=indices.device)  # the scan writes it all
    block = block or plan_block(indices.device)
    tiles = triton.cdiv(K * P, block)
    block_n = pow2_at_least(n_experts, MIN_TILE)
    counts = torch.empty(tiles, block_n, dtype=torch.int32, device=indices.device)
    base = torch.empty_like(counts)
    common = dict(K=K, BLOCK=block, BLOCK_N=block_n)
    _plan_count_kernel[(tiles,)](indices, counts, P, K * P, n_experts, **common)
    _plan_scan_kernel[(1,)](counts, base, offsets, tiles, n_experts, BLOCK_T=PLAN_SCAN_TILES, BLOCK_N=block_n)
    _plan_scatter_kernel[(tiles,)](indices, base, order, P, K * P, n_experts, **common)
    return order, offsets

def topk_softmax_fwd(logits: Tensor, k: int):
    """logits (P, N) -> (weights (P, k) logits' dtype, indices (P, k) int64)."""
    P, N = logits.shape
    logits = logits.contiguous()
    weights = torch.empty(P, k, dtype=logits.dtype, device=logits.device)
    indices = torch.empty(P, k, dtype=torch.int64, device=logits.device)
    block_p = topk_block_p(logits.device)
    _topk_softmax_fwd_kernel[(triton.cdiv(P, block_p),)](
        logits, weights, indices, P, N, K=k, BLOCK_P=block_p,
        BLOCK_N=pow2_at_least(N, MIN_TILE), BLOCK_K=pow2_at_least(k, MIN_TILE))
    return weights, indices


def topk_softmax_bwd(grad_weights: Tensor, weights: Tensor, indices: Tensor, n: int) -> Tensor:
    """d logits (P, n) in weights' dtype; zero for the logits that were not kept."""
    P, K = weights.shape
    dlogits = torch.zeros(P, n, dtype=weights.dtype, device=weights.device)
    block_p = topk_block_p(weights.device, backward=True)
    _topk_softmax_bwd_kernel[(triton.cdiv(P, block_p),)](
        grad_weights.contiguous(), weights, indices, dlogits, P, n,
        K=K, BLOCK_P=block_p, BLOCK_K=pow2_at_least(K, MIN_TILE))
    return dlogits


def _expert_args(w1, b1, w2, activation: str) -> tuple:
    """The expert kernels' stride arguments (w1's, w2's, b1's per expert) and form constexprs."""
    return ((*w1.stride(), *w2.stride(), b1.stride(0) if b1 is not None else 0),
            dict(HAS_B1=b1 is not None, ACT=ACT_CODES[activation], GATED=activation in GATED_ACTIVATIONS))


def moe_mlp_fwd(x, weights, indices, w1, b1, w2, b2, combine, dtype, activation: str = "gelu",
                config: Optional[LaunchConfig] = None):
    """-> (y (P, C) dtype, expert outputs (K*P, C) dtype, order (K*P,), offsets (N+1,)); GEMMs in
    ``dtype``. w1 (N, C, H1) and w2 (N, Hd, C) in any strides. ``config``: the expert kernels'
    tiles, :func:`default_config`'s by default."""
    P, K = indices.shape
    N, C = w1.shape[:2]
    Hd = w2.shape[1]
    cfg = config or default_config(K * P, N, C, Hd, x.device, dtype)
    order, offsets = dispatch_plan(indices, N)
    out = torch.empty(K * P, C, dtype=dtype, device=x.device)
    y = torch.empty(P, C, dtype=dtype, device=x.device)
    if P == 0:
        return y, out, order, offsets
    grid, blocks = _row_block_launch(K * P, N, cfg)
    strides, form = _expert_args(w1, b1, w2, activation)
    _moe_mlp_fwd_kernel[grid](
        x, w1, b1 if b1 is not None else w1, w2, b2 if b2 is not None else w2, out, order, offsets, P, C, Hd, N,
        *strides, HAS_B2=b2 is not None, PRECISION=dot_precision(dtype), **form, **blocks)
    block_p = combine_block_p(cfg.block_c, x.device)
    _moe_combine_fwd_kernel[(triton.cdiv(P, block_p),)](
        out, weights, y, P, C, K=K, LSE=combine == "logsumexp", BLOCK_P=block_p, BLOCK_C=cfg.block_c)
    return y, out, order, offsets


COMBINE_TILE_ELEMENTS = 2048  # at 4096 the combine backward spilled registers (bench/compile_check.py)


def combine_block_p(block_c: int, device: torch.device) -> int:
    """Rows per program of the combine kernels: a (BLOCK_P, block_c) tile of COMBINE_TILE_ELEMENTS
    on a GPU."""
    return _per_device(device, interpreter=256, cuda=max(MIN_DOT, COMBINE_TILE_ELEMENTS // block_c))


def moe_mlp_bwd(dy, x, weights, order, offsets, w1, b1, w2, out, combine, activation: str = "gelu",
                config: Optional[LaunchConfig] = None):
    """-> grads of (x, weights, w1, b1, w2, b2), each in its input's dtype (w1's for b1 and w2's for b2),
    w1's and w2's in their inputs' strides; GEMMs in out's dtype. ``config``: as :func:`moe_mlp_fwd`'s,
    with the backward's tiles by default."""
    P, K = weights.shape
    N, C, H1 = w1.shape
    Hd = w2.shape[1]
    cfg = config or default_config(K * P, N, C, Hd, x.device, out.dtype, backward=True)
    precision = dot_precision(out.dtype)
    dout = torch.empty_like(out)
    dweights = torch.empty(P, K, dtype=weights.dtype, device=x.device)
    block_p = combine_block_p(cfg.block_c, x.device)
    _moe_combine_bwd_kernel[(triton.cdiv(P, block_p),)](
        dy.contiguous(), out, weights, dout, dweights, P, C,
        K=K, LSE=combine == "logsumexp", BLOCK_P=block_p, BLOCK_C=cfg.block_c)
    b1_arg = b1 if b1 is not None else w1
    strides, form = _expert_args(w1, b1, w2, activation)
    dxa = torch.empty(K * P, C, dtype=torch.float32, device=x.device)
    grid, blocks = _row_block_launch(K * P, N, cfg)
    _moe_mlp_bwd_dx_kernel[grid](
        x, w1, b1_arg, w2, dout, dxa, order, offsets, P, C, Hd, N, *strides, PRECISION=precision, **form, **blocks)
    split = cfg.dw_split
    f32 = dict(dtype=torch.float32, device=x.device)
    dw1, db1 = torch.empty(split, N, C, H1, **f32), torch.empty(split, N, H1, **f32)
    dw2, db2 = torch.empty(split, N, Hd, C, **f32), torch.empty(split, N, C, **f32)
    _moe_mlp_bwd_dw_kernel[(N, triton.cdiv(Hd, cfg.block_h), split)](
        x, w1, b1_arg, w2, dout, order, offsets, dw1, db1, dw2, db2, P, C, Hd, N, *strides,
        SPLIT=split, PRECISION=precision, **form, **cfg.launch_args())
    dx = dxa.view(K, P, C).sum(0).to(x.dtype)
    # empty_like keeps w1's and w2's strides (a transposed nn.Linear view gets a transposed gradient).
    return (dx, dweights, torch.empty_like(w1).copy_(dw1.sum(0)), db1.sum(0).to(w1.dtype),
            torch.empty_like(w2).copy_(dw2.sum(0)), db2.sum(0).to(w2.dtype))


KERNELS = {"topk_softmax_fwd": _topk_softmax_fwd_kernel, "topk_softmax_bwd": _topk_softmax_bwd_kernel,
           "plan_count": _plan_count_kernel, "plan_scan": _plan_scan_kernel, "plan_scatter": _plan_scatter_kernel,
           "moe_mlp_fwd": _moe_mlp_fwd_kernel, "moe_mlp_bwd_dx": _moe_mlp_bwd_dx_kernel,
           "moe_mlp_bwd_dw": _moe_mlp_bwd_dw_kernel, "moe_combine_fwd": _moe_combine_fwd_kernel,
           "moe_combine_bwd": _moe_combine_bwd_kernel}
