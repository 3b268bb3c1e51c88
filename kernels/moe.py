"""Pixel-wise top-K routing and sparse expert MLPs (the DDER of M2Restore).

Two ops, each with a plain reference (``*_ref``), a sparse PyTorch path and a Triton path:

* ``topk_softmax(logits, k) -> (weights, indices)``: softmax over the K largest logits per row.
* ``moe_mlp(x, weights, indices, w1, b1, w2, b2, combine)``: every row runs only its K chosen
  experts ``GELU(x @ w1[e] + b1[e]) @ w2[e] + b2[e]`` and combines them with the gate weights.

Both sparse paths share one dispatch plan: the K*P (row, slot) assignments are sorted once by
expert (stable, so each expert's rows stay in row order) and each expert then works on one
contiguous segment of that order; the forward keeps the plan for the backward. The PyTorch path
sorts with ``torch.sort``; the Triton path with a counting sort of its own (three small kernels, no
host sync), so its whole dispatch can be captured in a CUDA graph. On CPU the PyTorch path runs
the routing and the K-way combination as C loops (``csrc/moe_cpu.c``) and the expert MLPs in
cache-sized row chunks. The per-assignment expert outputs ``O`` (K*P, C) go to a buffer in the
compute dtype (bf16 under autocast: half the bytes of float32), one row per assignment, and a
separate combine step reduces the K slots in float32. The buffer costs one extra write and read of
K*P*C values but keeps the result deterministic (no atomics), serves ``sum`` and ``logsumexp``
alike, and is exactly what the backward needs (``logsumexp`` gradients and the gate-weight
gradient both need the unweighted expert outputs).

Autocast: the op gets x and the expert parameters as they are (float32 parameters, activations
of any float dtype) and the compute dtype as an argument; the kernels round each tile to it as
they load it. Casting beforehand costs a launch per tensor (five per call) and a cast copy of x:
6 bytes of traffic per float32 element, 75 MB for the first DDER of a 512x512 image, where the
whole forward's lower bound is about 100 MB.

Triton forward: a program takes BLOCK_M sorted rows of one expert (found from the plan's N + 1
segment offsets, no block table), gathers their x rows, and
walks the hidden width in BLOCK_H chunks: GEMM1 (+b1), exact GELU, GEMM2 into a (BLOCK_M, C)
accumulator, so the hidden activation never leaves registers. The backward recomputes it: one
kernel for dx (same grid as the forward), one for the weight gradients (grid experts x hidden
chunks x row splits, partial sums reduced on the host side so the result is deterministic).
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _native
from ._backend import resolve_backend

from ._triton import dot_precision, gelu, gelu_grad, jit, tl, triton

COMBINES = ("sum", "logsumexp")


# --------------------------------------------------------------------------------------------
# References: obviously right, no speed ambitions.
# --------------------------------------------------------------------------------------------
def topk_softmax_ref(logits: Tensor, k: int):
    """logits (P, N) -> (weights (P, K) softmax of the K largest, sorted descending; indices (P, K) int64).
    Ties go to the lower expert index (stable descending sort)."""
    vals, idx = torch.sort(logits, dim=-1, descending=True, stable=True)
    return torch.softmax(vals[:, :k], dim=-1), idx[:, :k]


def moe_mlp_ref(x, weights, indices, w1, b1, w2, b2, combine: str = "sum"):
    """y[p] = sum_k weights[p,k] * (GELU(x[p] @ w1[e] + b1[e]) @ w2[e] + b2[e]), e = indices[p,k];
    combine="logsumexp": y[p] = log sum_k weights[p,k] * exp(expert output)."""
    P, C = x.shape
    K = indices.shape[1]
    outs = x.new_zeros(P, K, w2.shape[2])
    for e in range(w1.shape[0]):
        for k in range(K):
            rows = (indices[:, k] == e).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            h = x[rows] @ w1[e]
            if b1 is not None:
                h = h + b1[e]
            o = F.gelu(h) @ w2[e]
            if b2 is not None:
                o = o + b2[e]
            # .to: under autocast the expert GEMMs come out in the autocast dtype.
            outs = outs.index_put((rows, torch.full_like(rows, k)), o.to(outs.dtype))
    if combine == "sum":
        return (weights.unsqueeze(-1) * outs).sum(1)
    return torch.logsumexp(outs + torch.log(weights).unsqueeze(-1), dim=1)


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MoeTileConfig:
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


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _pow2_at_least_2(n: int) -> int:  # N = 1 or K = 1 would otherwise give a one-wide tile
    return max(2, triton.next_power_of_2(n))


@functools.lru_cache(maxsize=None)
def _shared_memory_per_block(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def _tile_config(n_assign: int, n_experts: int, C: int, Hd: int, device: torch.device, dtype: torch.dtype,
                 shared_memory: Optional[int] = None, backward: bool = False) -> MoeTileConfig:
    """Tiles for the expert kernels on ``device`` (the forward's, or with ``backward`` the dx and
    weight-gradient kernels'); ``shared_memory`` (bytes one block may use) defaults to the CUDA
    device's own."""
    block_c = _pow2_at_least_16(C)
    if device.type != "cuda":
        # The interpreter runs programs one after another at a fixed cost each: few, big programs.
        return MoeTileConfig(block_m=128, block_h=min(128, _pow2_at_least_16(Hd)), block_c=block_c,
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
    # 166,912). Speed on a GPU not yet compared (bench/tune.py times the alternatives).
    if dtype == torch.float32:
        block_m = 16
    else:
        block_m = 128 if block_c <= 64 else 64 if block_c <= 128 else 32
        block_m = block_m // 2 if backward else block_m
    block_h, num_stages = min(32, _pow2_at_least_16(Hd)), 2
    if dtype == torch.float32 and block_c > 128 and (shared_memory or _shared_memory_per_block(device)) < 160 * 1024:
        # 192 float32 channels took up to 164 KB per block: over the 99 KiB of an RTX 3090 or 4090.
        # Half-width hidden chunks in a single stage need at most 96 KiB (compiled for sm_86).
        block_h, num_stages = 16, 1
    # Aim for ~8 row blocks per weight-gradient program so the GPU still sees hundreds of programs.
    rows_per_expert = max(1, n_assign // max(1, n_experts))
    dw_split = max(1, min(64, rows_per_expert // (8 * block_m)))
    return MoeTileConfig(block_m=block_m, block_h=block_h, block_c=block_c, num_warps=8, dw_split=dw_split,
                         num_stages=num_stages)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
@jit
def _topk_softmax_fwd_kernel(logits_ptr, w_ptr, idx_ptr, P, N,
                             K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.arange(0, BLOCK_N)
    slots = tl.arange(0, BLOCK_K)
    rmask = rows < P
    free = rmask[:, None] & (cols[None, :] < N)
    s = tl.load(logits_ptr + rows[:, None] * N + cols[None, :], mask=free, other=float("-inf")).to(tl.float32)
    top_v = tl.full((BLOCK_P, BLOCK_K), float("-inf"), tl.float32)
    top_i = tl.zeros((BLOCK_P, BLOCK_K), tl.int32)
    # K rounds of "take the max": the lowest column holding the max wins, which settles ties.
    for k in tl.static_range(K):
        cand = tl.where(free, s, float("-inf"))
        m = tl.max(cand, axis=1)
        i = tl.min(tl.where(free & (cand == m[:, None]), cols[None, :], BLOCK_N), axis=1)
        free = free & (cols[None, :] != i[:, None])
        top_v = tl.where(slots[None, :] == k, m[:, None], top_v)
        top_i = tl.where(slots[None, :] == k, i[:, None], top_i)
    kept = slots[None, :] < K
    top_v = tl.where(rmask[:, None], top_v, 0.0)  # rows past P would compute -inf - -inf
    # Slot 0 holds the row max, so no separate max pass is needed for a stable softmax.
    num = tl.where(kept, tl.exp(top_v - tl.max(top_v, axis=1)[:, None]), 0.0)
    w = num / tl.sum(num, axis=1)[:, None]
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


@jit
def _moe_expert_fwd_kernel(x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr, order_ptr, offsets_ptr, P, C, HD, N,
                           HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
                           BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """out[a] = GELU(x[a % P] @ w1[e] + b1[e]) @ w2[e] + b2[e] for BLOCK_M sorted assignments a of
    one expert e, in out's dtype (the compute dtype): x, the weights and the biases are rounded to it
    as they are loaded (exactly as if cast beforehand), so autocast needs no cast kernels and no cast
    copy of x; the dots accumulate in float32."""
    e, a, tok, rmask = _segment_rows(order_ptr, offsets_ptr, tl.program_id(0), P, N, BLOCK_M, BLOCK_N)
    if e >= N:  # the grid is an upper bound on the block count
        return
    dt = out_ptr.dtype.element_ty
    c = tl.arange(0, BLOCK_C)
    cmask = c < C
    xt = tl.load(x_ptr + tok[:, None] * C + c[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0).to(dt)
    acc = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    w1_e = w1_ptr + e.to(tl.int64) * C * HD
    w2_e = w2_ptr + e.to(tl.int64) * HD * C
    for h0 in range(0, HD, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)
        hmask = hh < HD
        w1t = tl.load(w1_e + c[:, None] * HD + hh[None, :], mask=cmask[:, None] & hmask[None, :], other=0.0).to(dt)
        hpre = tl.dot(xt, w1t, input_precision=PRECISION)
        if HAS_B1:
            hpre += tl.load(b1_ptr + e * HD + hh, mask=hmask, other=0.0).to(dt).to(tl.float32)[None, :]
        w2t = tl.load(w2_e + hh[:, None] * C + c[None, :], mask=hmask[:, None] & cmask[None, :], other=0.0).to(dt)
        # Padded hidden columns are GELU(0) = 0 and meet zero rows of w2: no extra masking needed.
        acc = tl.dot(gelu(hpre).to(dt), w2t, acc, input_precision=PRECISION)
    if HAS_B2:
        acc += tl.load(b2_ptr + e * C + c, mask=cmask, other=0.0).to(dt).to(tl.float32)[None, :]
    tl.store(out_ptr + a[:, None] * C + c[None, :], acc.to(dt), mask=rmask[:, None] & cmask[None, :])


@jit
def _moe_expert_bwd_dx_kernel(x_ptr, w1_ptr, b1_ptr, w2_ptr, dout_ptr, dxa_ptr, order_ptr, offsets_ptr, P, C, HD, N,
                              HAS_B1: tl.constexpr,
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
    w1_e = w1_ptr + e.to(tl.int64) * C * HD
    w2_e = w2_ptr + e.to(tl.int64) * HD * C
    for h0 in range(0, HD, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)
        wmask = cmask[:, None] & (hh < HD)[None, :]
        w1t = tl.load(w1_e + c[:, None] * HD + hh[None, :], mask=wmask, other=0.0).to(dt)
        w2t_t = tl.load(w2_e + hh[None, :] * C + c[:, None], mask=wmask, other=0.0).to(dt)  # w2[e][chunk].T
        hpre = tl.dot(xt, w1t, input_precision=PRECISION)
        if HAS_B1:
            hpre += tl.load(b1_ptr + e * HD + hh, mask=hh < HD, other=0.0).to(dt).to(tl.float32)[None, :]
        dh = tl.dot(dout, w2t_t, input_precision=PRECISION) * gelu_grad(hpre)
        acc = tl.dot(dh.to(dt), tl.trans(w1t), acc, input_precision=PRECISION)
    tl.store(dxa_ptr + a[:, None] * C + c[None, :], acc, mask=io_mask)


@jit
def _moe_expert_bwd_dw_kernel(x_ptr, w1_ptr, b1_ptr, w2_ptr, dout_ptr, order_ptr, offsets_ptr,
                              dw1_ptr, db1_ptr, dw2_ptr, db2_ptr, P, C, HD, N,
                              SPLIT: tl.constexpr, HAS_B1: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
                              PRECISION: tl.constexpr):
    """Program (e, hidden chunk, split s) sums row blocks s, s+SPLIT, ... of expert e into
    partial buffers dw1 (SPLIT, N, C, HD), db1 (SPLIT, N, HD), dw2 (SPLIT, N, HD, C), db2 (SPLIT, N, C)
    (float32); dots in dout's dtype."""
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
    wmask = cmask[:, None] & hmask[None, :]
    w1t = tl.load(w1_ptr + e.to(tl.int64) * C * HD + c[:, None] * HD + hh[None, :], mask=wmask, other=0.0).to(dt)
    w2t_t = tl.load(w2_ptr + e.to(tl.int64) * HD * C + hh[None, :] * C + c[:, None], mask=wmask, other=0.0).to(dt)
    b1 = tl.zeros((BLOCK_H,), tl.float32)
    if HAS_B1:
        b1 = tl.load(b1_ptr + e * HD + hh, mask=hmask, other=0.0).to(dt).to(tl.float32)
    dw1 = tl.zeros((BLOCK_C, BLOCK_H), tl.float32)
    dw2 = tl.zeros((BLOCK_H, BLOCK_C), tl.float32)
    db1 = tl.zeros((BLOCK_H,), tl.float32)
    db2 = tl.zeros((BLOCK_C,), tl.float32)
    for r0 in range(start + s * BLOCK_M, end, SPLIT * BLOCK_M):
        r = r0 + tl.arange(0, BLOCK_M)
        rmask = r < end
        a = tl.load(order_ptr + r, mask=rmask, other=0)
        io_mask = rmask[:, None] & cmask[None, :]
        xt = tl.load(x_ptr + (a % P)[:, None] * C + c[None, :], mask=io_mask, other=0.0).to(dt)
        dout = tl.load(dout_ptr + a[:, None] * C + c[None, :], mask=io_mask, other=0.0)
        hpre = tl.dot(xt, w1t, input_precision=PRECISION) + b1[None, :]
        # Masked rows have GELU(b1) != 0 here, but their dout rows are zero, so they add nothing.
        dh = tl.dot(dout, w2t_t, input_precision=PRECISION) * gelu_grad(hpre)
        dw1 = tl.dot(tl.trans(xt), dh.to(dt), dw1, input_precision=PRECISION)
        dw2 = tl.dot(tl.trans(gelu(hpre).to(dt)), dout, dw2, input_precision=PRECISION)
        db1 += tl.sum(dh, axis=0)
        db2 += tl.sum(dout.to(tl.float32), axis=0)
    part = s * N + e
    tl.store(dw1_ptr + part.to(tl.int64) * C * HD + c[:, None] * HD + hh[None, :], dw1, mask=wmask)
    tl.store(dw2_ptr + part.to(tl.int64) * HD * C + hh[:, None] * C + c[None, :], dw2,
             mask=hmask[:, None] & cmask[None, :])
    tl.store(db1_ptr + part * HD + hh, db1, mask=hmask)
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
# Dispatch plan shared by both sparse paths
# --------------------------------------------------------------------------------------------
def _sort_assignments(indices: Tensor, n_experts: int):
    """Sort the K*P assignments by expert: (order (K*P,), offsets (N+1,)).

    Assignment a = k*P + p (slot-major), so per-assignment buffers viewed as (K, P, C) combine
    with contiguous elementwise ops over whole (P, C) slabs."""
    experts, order = torch.sort(indices.t().reshape(-1), stable=True)
    # searchsorted rather than bincount: no host sync (bincount sizes its output from the data).
    offsets = torch.searchsorted(experts, torch.arange(n_experts + 1, device=indices.device))
    return order, offsets


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


def _row_block_launch(n_assign: int, n_experts: int, cfg: MoeTileConfig):
    """Grid and block arguments of the row-block kernels (forward, dx). Expert e's segment takes
    ceil(count_e / block_m) programs; n_assign // block_m + N bounds their total without reading
    the counts back to the host, and the spare programs find no rows (``_segment_rows``)."""
    return (n_assign // cfg.block_m + n_experts,), dict(BLOCK_N=_pow2_at_least_2(n_experts), **cfg.launch_args())


def _plan_triton(indices: Tensor, n_experts: int, block: Optional[int] = None):
    """``_sort_assignments`` in three Triton launches (count per tile of ``block`` assignments,
    scan, scatter): no sort library calls, no host sync, so the whole dispatch can be captured in
    a CUDA graph."""
    P, K = indices.shape
    order = torch.empty(K * P, dtype=torch.int64, device=indices.device)
    if P == 0:  # the kernels take assignment ids modulo P
        return order, torch.zeros(n_experts + 1, dtype=torch.int64, device=indices.device)
    offsets = torch.empty(n_experts + 1, dtype=torch.int64, device=indices.device)  # the scan writes it all
    block = block or (4096 if indices.device.type != "cuda" else 1024)
    tiles = triton.cdiv(K * P, block)
    block_n = _pow2_at_least_2(n_experts)
    counts = torch.empty(tiles, block_n, dtype=torch.int32, device=indices.device)
    base = torch.empty_like(counts)
    common = dict(K=K, BLOCK=block, BLOCK_N=block_n)
    _plan_count_kernel[(tiles,)](indices, counts, P, K * P, n_experts, **common)
    _plan_scan_kernel[(1,)](counts, base, offsets, tiles, n_experts, BLOCK_T=256, BLOCK_N=block_n)
    _plan_scatter_kernel[(tiles,)](indices, base, order, P, K * P, n_experts, **common)
    return order, offsets


# --------------------------------------------------------------------------------------------
# topk_softmax: both paths and the custom op
# --------------------------------------------------------------------------------------------
def _topk_softmax_torch(logits: Tensor, k: int):
    lib = _native_moe(logits)
    if lib is not None and logits.shape[1] <= _NATIVE_TOPK_MAX_N:
        # float32 selection picks what the input dtype would (the conversion is exact); the
        # softmax runs in float32 and is rounded to the logits' dtype.
        P, N = logits.shape
        s = logits.float().contiguous()
        weights, indices = s.new_empty(P, k), torch.empty(P, k, dtype=torch.int64)
        lib.topk_softmax_fwd(ctypes.c_int64(P), ctypes.c_int64(N), ctypes.c_int64(k),
                             ctypes.c_int(torch.get_num_threads()), *map(_native.ptr, (s, weights, indices)))
        return weights.to(logits.dtype), indices
    # K rounds of "take the max" (as the Triton kernel): among equal values the lowest free column
    # wins (argmax returns the first maximum), which settles ties and repeated -inf alike.
    free = torch.ones_like(logits, dtype=torch.bool)
    vals, idxs = [], []
    for _ in range(k):
        cand = logits.masked_fill(~free, float("-inf"))
        m = cand.amax(dim=1, keepdim=True)
        i = ((cand == m) & free).to(torch.uint8).argmax(dim=1, keepdim=True)
        free.scatter_(1, i, False)
        vals.append(m)
        idxs.append(i)
    return torch.softmax(torch.cat(vals, 1), dim=1), torch.cat(idxs, 1)


def _topk_softmax_triton(logits: Tensor, k: int):
    P, N = logits.shape
    logits = logits.contiguous()
    weights = torch.empty(P, k, dtype=logits.dtype, device=logits.device)
    indices = torch.empty(P, k, dtype=torch.int64, device=logits.device)
    block_p = 1024 if logits.device.type != "cuda" else 128
    _topk_softmax_fwd_kernel[(triton.cdiv(P, block_p),)](
        logits, weights, indices, P, N, K=k, BLOCK_P=block_p,
        BLOCK_N=_pow2_at_least_2(N), BLOCK_K=_pow2_at_least_2(k))
    return weights, indices


@torch.library.custom_op("m2restore_kernels::topk_softmax", mutates_args=())
def _topk_softmax_op(logits: Tensor, k: int, backend: str) -> tuple[Tensor, Tensor]:
    if backend == "triton":
        return _topk_softmax_triton(logits, k)
    return _topk_softmax_torch(logits, k)


@_topk_softmax_op.register_fake
def _(logits, k, backend):
    P = logits.shape[0]
    return logits.new_empty(P, k), logits.new_empty(P, k, dtype=torch.int64)


@torch.library.custom_op("m2restore_kernels::topk_softmax_bwd", mutates_args=())
def _topk_softmax_bwd_op(grad_weights: Tensor, weights: Tensor, indices: Tensor, n: int, backend: str) -> Tensor:
    P, K = weights.shape
    dlogits = torch.zeros(P, n, dtype=weights.dtype, device=weights.device)
    if backend == "triton":
        block_p = 1024 if weights.device.type != "cuda" else 256
        _topk_softmax_bwd_kernel[(triton.cdiv(P, block_p),)](
            grad_weights.contiguous(), weights, indices, dlogits, P, n,
            K=K, BLOCK_P=block_p, BLOCK_K=_pow2_at_least_2(K))
        return dlogits
    g, w = grad_weights.float(), weights.float()
    d = w * (g - (w * g).sum(1, keepdim=True))
    return dlogits.scatter_(1, indices, d.to(dlogits.dtype))


@_topk_softmax_bwd_op.register_fake
def _(grad_weights, weights, indices, n, backend):
    return weights.new_empty(weights.shape[0], n)


def _topk_setup_context(ctx, inputs, output):
    logits, _, backend = inputs
    ctx.n, ctx.backend = logits.shape[1], backend
    ctx.save_for_backward(*output)


def _topk_backward(ctx, grad_weights, _grad_indices):
    weights, indices = ctx.saved_tensors
    return _topk_softmax_bwd_op(grad_weights, weights, indices, ctx.n, ctx.backend), None, None


_topk_softmax_op.register_autograd(_topk_backward, setup_context=_topk_setup_context)


def topk_softmax(logits: Tensor, k: int, backend: str = "auto"):
    """Top-K routing: softmax over the K largest logits of each row.

    logits: (P, N) floating. Returns ``weights`` (P, K), logits' dtype, softmax of the kept
    logits sorted descending, and ``indices`` (P, K) int64; ties go to the lower expert index.
    Differentiable in ``logits`` (the dropped logits get zero gradient).
    """
    if not isinstance(logits, Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"topk_softmax: logits must be a floating (P, N) tensor, got "
                         f"{getattr(logits, 'dtype', type(logits))} of shape {tuple(getattr(logits, 'shape', ()))}")
    N = logits.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= N:
        raise ValueError(f"topk_softmax: k must be an int in [1, N={N}], got {k!r}")
    return _topk_softmax_op(logits, k, resolve_backend(backend, logits.device))


# --------------------------------------------------------------------------------------------
# moe_mlp: both sparse paths
# --------------------------------------------------------------------------------------------
_NATIVE_TOPK_MAX_N = 64  # TOPK_MAX_N in csrc/moe_cpu.c


def _native_moe(t: Tensor):
    """The C loops (csrc/moe_cpu.c) for CPU tensors where they build, else None. PyTorch's CPU
    log and logaddexp run scalar (9-14 ms per 2.4 M elements on the project's EPYC), which made the
    combination as costly as the expert GEMMs at the first DDER; its (P, 6) top-2 took ~4 ms."""
    return _native.load("moe_cpu") if t.device.type == "cpu" else None


def _combine_torch(out: Tensor, weights: Tensor, combine: str) -> Tensor:
    """out (K, P, C) float32, weights (P, K) -> float32 y (P, C)."""
    K, P, C = out.shape
    lib = _native_moe(out)
    if lib is not None:
        # Named, so the contiguous float32 copies (if any) outlive the call that reads them.
        out, w, y = out.contiguous(), weights.float().contiguous(), out.new_empty(P, C)
        lib.combine_fwd(ctypes.c_int64(P), ctypes.c_int64(C), ctypes.c_int64(K), ctypes.c_int(combine != "sum"),
                        ctypes.c_int(torch.get_num_threads()), *map(_native.ptr, (out, w, y)))
        return y
    # Fused two-operand ops over whole (P, C) slabs: on CPU this is several times faster than a
    # reduction over the K axis (torch.logsumexp adds extra passes for its inf handling).
    w = weights.float().t().unsqueeze(-1)
    if combine == "sum":
        y = out[0] * w[0]
        for k in range(1, out.shape[0]):
            y.addcmul_(out[k], w[k])
        return y
    log_w = w.log()
    y = out[0] + log_w[0]
    for k in range(1, out.shape[0]):
        y = torch.logaddexp(y, out[k] + log_w[k])
    return y


def _pad_hidden(w1, b1, w2, multiple: int = 16):
    """Zero-pad the hidden width to a multiple of 16: CPU BLAS (MKL, measured on an AMD EPYC) runs
    GEMMs with an odd output width (127, 255, 510) up to 5x slower. Padded units see zero weights and
    bias, so they are GELU(0) = 0 and meet zero rows of w2."""
    pad = -w1.shape[2] % multiple
    if pad == 0:
        return w1, b1, w2
    return F.pad(w1, (0, pad)), F.pad(b1, (0, pad)) if b1 is not None else None, F.pad(w2, (0, 0, 0, pad))


def _segments(offsets: Tensor):
    """(expert, first, end) of every expert that has rows in the sorted order."""
    bounds = offsets.tolist()
    return [(e, lo, hi) for e, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])) if hi > lo]


def _inverse(order: Tensor) -> Tensor:
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def _linear(x: Tensor, w: Tensor, b: Optional[Tensor], out: Optional[Tensor] = None) -> Tensor:
    return torch.mm(x, w, out=out) if b is None else torch.addmm(b, x, w, out=out)


def _row_chunks(lo: int, hi: int, hidden: int, like: Tensor):
    """[lo, hi) cut, on a CPU, into chunks whose (rows, hidden) activation stays near 2 MiB, so it is
    still in cache between the GEMMs that write and read it. One GEMM over an expert's whole
    segment sent a 50 MB hidden activation through memory three times: at the first DDER's widths
    (100k rows, hidden 128) the expert MLP took 50 ms that way and 18.6 ms in 4096-row chunks on
    the project's EPYC (2 threads); 1 MiB chunks were a little slower forward and backward. The
    budget is in bytes: bf16 GEMMs there want at least 2048 rows (DDER 1's bf16 forward: 33.9 ms
    in 4096-row chunks, 20.8 ms in 8192-row ones). A GPU gets the whole segment: there chunks
    would only multiply the launches."""
    rows = max(256, (1 << 21) // (hidden * like.element_size())) if like.device.type == "cpu" else max(1, hi - lo)
    return ((s, min(s + rows, hi)) for s in range(lo, hi, rows))


def _cast(dtype: torch.dtype, *tensors):
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def _moe_fwd_torch(x, weights, indices, w1, b1, w2, b2, combine, dtype):
    P, K = indices.shape
    w1, b1, w2 = _pad_hidden(*_cast(dtype, w1, b1, w2))
    (b2,) = _cast(dtype, b2)
    order, offsets = _sort_assignments(indices, w1.shape[0])
    tokens = order % P
    # GEMM2 writes straight into its expert's slice of the sorted order; one row gather then
    # restores (K, P) order. Per-expert row scatters (index_copy_, index_add_) are far slower on CPU.
    out = x.new_empty(K * P, w2.shape[2], dtype=dtype)
    for e, lo, hi in _segments(offsets):
        b1e, b2e = (None if b is None else b[e] for b in (b1, b2))
        for s, t in _row_chunks(lo, hi, w1.shape[2], w1):
            h = F.gelu(_linear(x.index_select(0, tokens[s:t]).to(dtype), w1[e], b1e))
            _linear(h, w2[e], b2e, out=out[s:t])
    out = out.index_select(0, _inverse(order))
    return _combine_torch(out.view(K, P, x.shape[1]).float(), weights, combine).to(dtype), out, order, offsets


def _combine_bwd_torch(dy, out, weights, combine):
    """out (K, P, C) -> (dout (K, P, C) float32, dweights (P, K) float32)."""
    K, P, C = out.shape
    lib = _native_moe(out)
    if lib is not None:
        dy, out, w = dy.float().contiguous(), out.contiguous(), weights.float().contiguous()
        dout, dweights = out.new_empty(K, P, C), out.new_empty(P, K)
        lib.combine_bwd(ctypes.c_int64(P), ctypes.c_int64(C), ctypes.c_int64(K), ctypes.c_int(combine != "sum"),
                        ctypes.c_int(torch.get_num_threads()), *map(_native.ptr, (dy, out, w, dout, dweights)))
        return dout, dweights
    dy, w = dy.float(), weights.float().t().unsqueeze(-1)
    if combine == "sum":
        return (dy * w).contiguous(), (out * dy).sum(-1).t()
    # d y / d o_k = w_k exp(o_k - y): one buffer, updated in place (these passes dominate on CPU).
    grad = (out - _combine_torch(out, weights, combine)).exp_().mul_(dy)
    dweights = grad.sum(-1).t()
    return grad.mul_(w), dweights


def _moe_bwd_torch(dy, x, weights, order, offsets, w1, b1, w2, out, combine):
    P, K = weights.shape
    Hd, dtype, w1_dtype, w2_dtype = w1.shape[2], out.dtype, w1.dtype, w2.dtype  # before the casts below
    dout, dweights = _combine_bwd_torch(dy, out.view(K, P, x.shape[1]).float(), weights, combine)
    w1, b1, w2 = _pad_hidden(*_cast(dtype, w1, b1, w2))
    tokens = order % P
    dout = dout.view(K * P, x.shape[1]).index_select(0, order).to(dtype)
    dx_sorted = torch.empty_like(dout)
    # Parameter gradients sum over row chunks in float32, so 16-bit ones are rounded once, at the end.
    f32 = dict(dtype=torch.float32)
    dw1, dw2 = torch.zeros_like(w1, **f32), torch.zeros_like(w2, **f32)
    db1 = w1.new_zeros(w1.shape[0], w1.shape[2], **f32)
    db2 = w2.new_zeros(w2.shape[0], w2.shape[2], **f32)
    for e, lo, hi in _segments(offsets):
        for s, t in _row_chunks(lo, hi, w1.shape[2], w1):
            xe, de = x.index_select(0, tokens[s:t]).to(dtype), dout[s:t]
            hpre = _linear(xe, w1[e], None if b1 is None else b1[e])
            dw2[e] += F.gelu(hpre).t() @ de
            db2[e] += de.sum(0, **f32)
            dh = torch.ops.aten.gelu_backward(de @ w2[e].t(), hpre)
            dw1[e] += xe.t() @ dh
            db1[e] += dh.sum(0, **f32)
            torch.mm(dh, w1[e].t(), out=dx_sorted[s:t])
    dx_slots = dx_sorted.index_select(0, _inverse(order)).view(K, P, x.shape[1])
    dx = dx_slots[0].to(torch.float32, copy=True)
    for k in range(1, K):
        dx += dx_slots[k]
    # Gradients in each input's own dtype (autocast's casts are inside the op); custom-op outputs
    # must have the fake's (contiguous) strides; the hidden padding comes off here.
    return tuple(t.contiguous() for t in (dx.to(x.dtype), dweights.to(weights.dtype), dw1[:, :, :Hd].to(w1_dtype),
                                          db1[:, :Hd].to(w1_dtype), dw2[:, :Hd].to(w2_dtype), db2.to(w2_dtype)))


def _moe_fwd_triton(x, weights, indices, w1, b1, w2, b2, combine, dtype, cfg: Optional[MoeTileConfig] = None):
    """``cfg``: the expert kernel's tiles, ``_tile_config``'s by default (bench/tune.py times others)."""
    P, K = indices.shape
    N, C, Hd = w1.shape
    cfg = cfg or _tile_config(K * P, N, C, Hd, x.device, dtype)
    order, offsets = _plan_triton(indices, N)
    out = torch.empty(K * P, C, dtype=dtype, device=x.device)
    y = torch.empty(P, C, dtype=dtype, device=x.device)
    if P == 0:
        return y, out, order, offsets
    grid, blocks = _row_block_launch(K * P, N, cfg)
    _moe_expert_fwd_kernel[grid](
        x, w1, b1 if b1 is not None else w1, w2, b2 if b2 is not None else w2, out, order, offsets, P, C, Hd, N,
        HAS_B1=b1 is not None, HAS_B2=b2 is not None, PRECISION=dot_precision(dtype), **blocks)
    block_p = _combine_block_p(cfg.block_c, x.device)
    _moe_combine_fwd_kernel[(triton.cdiv(P, block_p),)](
        out, weights, y, P, C, K=K, LSE=combine == "logsumexp", BLOCK_P=block_p, BLOCK_C=cfg.block_c)
    return y, out, order, offsets


def _combine_block_p(block_c: int, device: torch.device) -> int:
    # Keep a (BLOCK_P, BLOCK_C) tile near 2K elements on the GPU (at 4K the backward spilled registers,
    # bench/compile_check.py); the interpreter prefers one big tile.
    return 256 if device.type != "cuda" else max(16, 2048 // block_c)


def _moe_bwd_triton(dy, x, weights, order, offsets, w1, b1, w2, out, combine, cfg: Optional[MoeTileConfig] = None):
    P, K = weights.shape
    N, C, Hd = w1.shape
    cfg = cfg or _tile_config(K * P, N, C, Hd, x.device, out.dtype, backward=True)
    precision = dot_precision(out.dtype)
    dout = torch.empty_like(out)
    dweights = torch.empty(P, K, dtype=weights.dtype, device=x.device)
    block_p = _combine_block_p(cfg.block_c, x.device)
    _moe_combine_bwd_kernel[(triton.cdiv(P, block_p),)](
        dy.contiguous(), out, weights, dout, dweights, P, C,
        K=K, LSE=combine == "logsumexp", BLOCK_P=block_p, BLOCK_C=cfg.block_c)
    b1_arg = b1 if b1 is not None else w1
    dxa = torch.empty(K * P, C, dtype=torch.float32, device=x.device)
    grid, blocks = _row_block_launch(K * P, N, cfg)
    _moe_expert_bwd_dx_kernel[grid](
        x, w1, b1_arg, w2, dout, dxa, order, offsets, P, C, Hd, N,
        HAS_B1=b1 is not None, PRECISION=precision, **blocks)
    split = cfg.dw_split
    f32 = dict(dtype=torch.float32, device=x.device)
    dw1, db1 = torch.empty(split, N, C, Hd, **f32), torch.empty(split, N, Hd, **f32)
    dw2, db2 = torch.empty(split, N, Hd, C, **f32), torch.empty(split, N, C, **f32)
    _moe_expert_bwd_dw_kernel[(N, triton.cdiv(Hd, cfg.block_h), split)](
        x, w1, b1_arg, w2, dout, order, offsets, dw1, db1, dw2, db2, P, C, Hd, N,
        SPLIT=split, HAS_B1=b1 is not None, PRECISION=precision, **cfg.launch_args())
    dx = dxa.view(K, P, C).sum(0).to(x.dtype)
    return (dx, dweights, dw1.sum(0).to(w1.dtype), db1.sum(0).to(w1.dtype),
            dw2.sum(0).to(w2.dtype), db2.sum(0).to(w2.dtype))


# --------------------------------------------------------------------------------------------
# moe_mlp: custom ops and public function
# --------------------------------------------------------------------------------------------
def _check_index_range(indices: Tensor, n_experts: int):
    # Data-dependent (a host sync on CUDA), so it lives in the op body, not in the traced wrapper,
    # and is skipped while a CUDA graph is being captured.
    if indices.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    if indices.numel() and bool(((indices < 0) | (indices >= n_experts)).any()):
        raise ValueError(f"moe_mlp: indices must lie in [0, N={n_experts}), got values in "
                         f"[{int(indices.min())}, {int(indices.max())}]")


@torch.library.custom_op("m2restore_kernels::moe_mlp", mutates_args=())
def _moe_mlp_op(x: Tensor, weights: Tensor, indices: Tensor, w1: Tensor, b1: Optional[Tensor],
                w2: Tensor, b2: Optional[Tensor], combine: str, backend: str, check_indices: bool,
                dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """GEMMs in ``dtype`` whatever the inputs' dtypes (autocast). -> (y (P, C) dtype, and for the
    backward: expert outputs (K*P, C) dtype, row k*P + p; the dispatch plan, order (K*P,) int64 and
    offsets (N+1,) int64, see ``_sort_assignments``)."""
    if check_indices:
        _check_index_range(indices, w1.shape[0])
    impl = _moe_fwd_triton if backend == "triton" else _moe_fwd_torch
    return impl(x, weights, indices, w1, b1, w2, b2, combine, dtype)


@_moe_mlp_op.register_fake
def _(x, weights, indices, w1, b1, w2, b2, combine, backend, check_indices, dtype):
    KP = indices.numel()
    return (x.new_empty(x.shape, dtype=dtype), x.new_empty(KP, x.shape[1], dtype=dtype),
            indices.new_empty(KP, dtype=torch.int64), indices.new_empty(w1.shape[0] + 1, dtype=torch.int64))


@torch.library.custom_op("m2restore_kernels::moe_mlp_bwd", mutates_args=())
def _moe_mlp_bwd_op(dy: Tensor, x: Tensor, weights: Tensor, order: Tensor, offsets: Tensor, w1: Tensor,
                    b1: Optional[Tensor], w2: Tensor, out: Tensor, combine: str, backend: str
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> grads of (x, weights, w1, b1, w2, b2), each in its input's dtype (w1's for b1 and w2's for
    b2, which are computed even when the bias is None); GEMMs in ``out``'s dtype."""
    impl = _moe_bwd_triton if backend == "triton" else _moe_bwd_torch
    return impl(dy, x, weights, order, offsets, w1, b1, w2, out, combine)


@_moe_mlp_bwd_op.register_fake
def _(dy, x, weights, order, offsets, w1, b1, w2, out, combine, backend):
    return (torch.empty_like(x), torch.empty_like(weights), torch.empty_like(w1),
            w1.new_empty(w1.shape[0], w1.shape[2]), torch.empty_like(w2), w2.new_empty(w2.shape[0], w2.shape[2]))


def _moe_setup_context(ctx, inputs, output):
    x, weights, indices, w1, b1, w2, b2, combine, backend, _check, _dtype = inputs
    ctx.combine, ctx.backend, ctx.has_b1, ctx.has_b2 = combine, backend, b1 is not None, b2 is not None
    _, out, order, offsets = output
    ctx.save_for_backward(x, weights, order, offsets, w1, b1, w2, out)


def _moe_backward(ctx, dy, *_grads_of_saved_outputs):
    x, weights, order, offsets, w1, b1, w2, out = ctx.saved_tensors
    dx, dweights, dw1, db1, dw2, db2 = _moe_mlp_bwd_op(
        dy, x, weights, order, offsets, w1, b1, w2, out, ctx.combine, ctx.backend)
    return (dx, dweights, None, dw1, db1 if ctx.has_b1 else None, dw2, db2 if ctx.has_b2 else None,
            None, None, None, None)


_moe_mlp_op.register_autograd(_moe_backward, setup_context=_moe_setup_context)


def _check_moe_args(x, weights, indices, w1, b1, w2, b2, combine, autocast: bool):
    named = dict(x=x, weights=weights, indices=indices, w1=w1, b1=b1, w2=w2, b2=b2)
    for name, t in named.items():
        if t is None and name in ("b1", "b2"):
            continue
        if not isinstance(t, Tensor):
            raise ValueError(f"moe_mlp: {name} must be a tensor, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"moe_mlp: {name} is on {t.device} but x is on {x.device}")
    if combine not in COMBINES:
        raise ValueError(f"moe_mlp: combine must be one of {COMBINES}, got {combine!r}")
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"moe_mlp: x must be a floating (P, C) tensor, got {x.dtype} of shape {tuple(x.shape)}")
    P, C = x.shape
    if indices.dim() != 2 or indices.shape[0] != P or indices.shape[1] < 1:
        raise ValueError(f"moe_mlp: indices must have shape (P={P}, K>=1), got {tuple(indices.shape)}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"moe_mlp: indices must be int64 or int32, got {indices.dtype}")
    if weights.shape != indices.shape or not weights.is_floating_point():
        raise ValueError(f"moe_mlp: weights must be a floating tensor of shape {tuple(indices.shape)} like indices, "
                         f"got {weights.dtype} of shape {tuple(weights.shape)}")
    if w1.dim() != 3 or w1.shape[1] != C:
        raise ValueError(f"moe_mlp: w1 must have shape (N, C={C}, Hd), got {tuple(w1.shape)}")
    N, _, Hd = w1.shape
    expected = dict(w2=(N, Hd, C), b1=(N, Hd), b2=(N, C))
    for name, shape in expected.items():
        t = named[name]
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"moe_mlp: {name} must have shape {shape}, got {tuple(t.shape)}")
    for name in ("w1", "b1", "w2", "b2"):
        t = named[name]
        if t is not None and not t.is_floating_point():
            raise ValueError(f"moe_mlp: {name} must be floating, got {t.dtype}")
        if t is not None and t.dtype != x.dtype and not autocast:
            raise ValueError(f"moe_mlp: {name} has dtype {t.dtype} but x has {x.dtype} (mixed dtypes only "
                             f"under autocast)")


def moe_mlp(x: Tensor, weights: Tensor, indices: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
            b2: Optional[Tensor], combine: str = "sum", backend: str = "auto", *,
            check_indices: bool = True) -> Tensor:
    """Sparse mixture of expert MLPs; only the K experts chosen per row are computed.

    x (P, C) floating; weights (P, K) floating gate weights; indices (P, K) int64/int32 in [0, N);
    w1 (N, C, Hd), b1 (N, Hd) or None, w2 (N, Hd, C), b2 (N, C) or None, all in x's dtype.
    Returns y (P, C) in x's dtype:
    ``y[p] = sum_k weights[p,k] * (GELU(x[p] @ w1[e] + b1[e]) @ w2[e] + b2[e])``, e = indices[p,k],
    or with ``combine="logsumexp"`` ``y[p] = log sum_k weights[p,k] * exp(expert output)``.
    Differentiable in every floating input. Under autocast (CUDA, or CPU where bf16 GEMMs are
    fast) the GEMMs take the autocast dtype and y comes in it, as if x and the expert parameters
    had been cast first; x and the parameters may then differ in dtype. The casts happen as the
    kernels load their tiles (no cast copies), and each gradient comes in its input's dtype. The
    kernels accumulate in float32 and the K-way combination runs in float32.

    ``check_indices=False`` skips the ValueError check that every index lies in [0, N): on CUDA
    that check reads a flag back to the host, a sync on every call. Pass it for indices that
    :func:`topk_softmax` made; an out-of-range index then leaves its row undefined (it is never
    used to read or write out of bounds).
    """
    autocast = (isinstance(x, Tensor) and x.device.type in ("cuda", "cpu")
                and torch.is_autocast_enabled(x.device.type))
    _check_moe_args(x, weights, indices, w1, b1, w2, b2, combine, autocast)
    dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
    args = [t.contiguous() if t is not None else None for t in (x, weights, indices.long(), w1, b1, w2, b2)]
    return _moe_mlp_op(*args, combine, resolve_backend(backend, x.device), check_indices, dtype)[0]
