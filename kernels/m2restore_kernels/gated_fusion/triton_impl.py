"""Triton path of the gated fusion: forward and backward kernels, launch configuration, launchers.

Forward: one program per 2-D tile of BLOCK_P pixels (BLOCK_P // BLOCK_W rows of BLOCK_W columns,
masked where the image border cuts it) and one image. It computes the gate's C x C product with
``tl.dot`` in channel blocks of BLOCK_N, then, per channel block of BLOCK_C, the depthwise conv
from the tile and its one-pixel halo (nine shifted, border-masked loads that hit cache), the blend
and the residual, and stores ``out`` once. Only y (plus halo), mamba, residual and out touch DRAM.
Configs are fixed per shape (:func:`default_config`), not autotuned.

Backward (all in Triton except the C x C weight gradient): kernel 1 recomputes the gate and the
conv per tile and writes dmamba, dz = dL/d(conv pre-activation) and dh = dL/dh to workspaces, plus
per-tile partial sums for the small parameter gradients (summed afterwards with torch:
deterministic, no atomics); kernel 2 forms dy = dh W1 + conv_transpose(dz) with ``tl.dot`` and the
halo of dz. dW1 = sum_p dh_p y_p^T is one cuBLAS GEMM over the workspace.

Public but advanced (``m2restore_kernels.tuning``): :class:`LaunchConfig`, :func:`default_config`,
:func:`gated_fusion_fwd` and :func:`gated_fusion_bwd` with ``config=``, ``KERNELS``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .._triton import dot_precision, gelu, gelu_grad, jit, tl, triton



@jit
def _pixel_tile(H, W, BLOCK_P: tl.constexpr, BLOCK_W: tl.constexpr):
    """Rows, columns and validity of this program's (BLOCK_P // BLOCK_W) x BLOCK_W block of pixels.
    Dividing by the constexpr BLOCK_W (not by W) keeps columns provably contiguous, so loads along a
    unit-stride W (NCHW) vectorise and coalesce."""
    tiles_w = tl.cdiv(W, BLOCK_W)
    p = tl.arange(0, BLOCK_P)
    rows = (tl.program_id(0) // tiles_w) * (BLOCK_P // BLOCK_W) + p // BLOCK_W
    cols = (tl.program_id(0) % tiles_w) * BLOCK_W + p % BLOCK_W
    return rows, cols, (rows < H) & (cols < W)


@jit
def _tile_offsets(rows, cols, offs_c, s_c, s_h, s_w):
    return rows[:, None] * s_h + cols[:, None] * s_w + offs_c[None, :] * s_c


@jit
def _load_tap(ptr, rows, cols, mask_p, dr: tl.constexpr, dc: tl.constexpr, H, W, offs_c, mask_c, s_c, s_h, s_w):
    """The [BLOCK_P, BLOCK_C] tile shifted by (dr, dc) pixels, zero outside the image (float32)."""
    r = rows + dr
    c = cols + dc
    inside = mask_p & (r >= 0) & (r < H) & (c >= 0) & (c < W)
    return tl.load(ptr + _tile_offsets(r, c, offs_c, s_c, s_h, s_w),
                   mask=inside[:, None] & mask_c[None, :], other=0.0).to(tl.float32)


@jit
def _dwconv(y_ptr, dw_ptr, dwb_ptr, rows, cols, mask_p, H, W, offs_c, mask_c, s_c, s_h, s_w,
            HAS_DWB: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Depthwise 3x3 conv pre-activation (+ dw_bias) for one channel block; dw is (C, 9) contiguous."""
    z = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    for t in tl.static_range(9):
        w = tl.load(dw_ptr + offs_c * 9 + t, mask=mask_c, other=0.0).to(tl.float32)
        tap = _load_tap(y_ptr, rows, cols, mask_p, t // 3 - 1, t % 3 - 1, H, W, offs_c, mask_c, s_c, s_h, s_w)
        z += tap * w[None, :]
    if HAS_DWB:
        z += tl.load(dwb_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    return z


@jit
def _gate_hidden(y_ptr, w1_ptr, b1_ptr, pb_ptr, pix, mask_p, n0, C, s_c,
                 HAS_B1: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """h[:, n0:n0+BLOCK_N] = y W1^T + g1_bias + prompt_bias (float32) and the channel mask.
    W1 (C, C) is contiguous; its transpose is read through the pointer grid, never materialised."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < C
    h = tl.zeros((BLOCK_P, BLOCK_N), tl.float32)
    for k0 in range(0, C, BLOCK_N):
        offs_k = k0 + tl.arange(0, BLOCK_N)
        mask_k = offs_k < C
        y = tl.load(y_ptr + pix[:, None] + offs_k[None, :] * s_c, mask=mask_p[:, None] & mask_k[None, :], other=0.0)
        w1t = tl.load(w1_ptr + offs_n[None, :] * C + offs_k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        h = tl.dot(y.to(w1t.dtype), w1t, h, input_precision=DOT_PRECISION)
    bias = tl.load(pb_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if HAS_B1:
        bias += tl.load(b1_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    return h + bias[None, :], offs_n, mask_n


@jit
def _gate(y_ptr, w1_ptr, b1_ptr, pb_ptr, w2_ptr, b2_ptr, pix, mask_p, C, s_c,
          HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
          BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """G = sigmoid(w2 . GELU(h) + g2_bias) per pixel of the tile (float32, [BLOCK_P])."""
    logit = tl.zeros((BLOCK_P,), tl.float32)
    for n0 in range(0, C, BLOCK_N):
        h, offs_n, mask_n = _gate_hidden(y_ptr, w1_ptr, b1_ptr, pb_ptr, pix, mask_p, n0, C, s_c,
                                         HAS_B1, BLOCK_P, BLOCK_N, DOT_PRECISION)
        w2 = tl.load(w2_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        logit += tl.sum(gelu(h) * w2[None, :], axis=1)
    if HAS_B2:
        logit += tl.load(b2_ptr).to(tl.float32)
    return tl.sigmoid(logit)


@jit
def _gated_fusion_fwd_kernel(
    y_ptr, m_ptr, r_ptr, o_ptr, pb_ptr, dw_ptr, dwb_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
    C, H, W,
    s_yb, s_yc, s_yh, s_yw, s_mb, s_mc, s_mh, s_mw, s_rb, s_rc, s_rh, s_rw, s_ob, s_oc, s_oh, s_ow,
    HAS_RES: tl.constexpr, HAS_DWB: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)  # batch offsets can pass 2**31 elements
    y_ptr += b * s_yb
    m_ptr += b * s_mb
    r_ptr += b * s_rb
    o_ptr += b * s_ob
    pb_ptr += b * C
    rows, cols, mask_p = _pixel_tile(H, W, BLOCK_P, BLOCK_W)

    g = _gate(y_ptr, w1_ptr, b1_ptr, pb_ptr, w2_ptr, b2_ptr, rows * s_yh + cols * s_yw, mask_p, C, s_yc,
              HAS_B1, HAS_B2, BLOCK_P, BLOCK_N, DOT_PRECISION)[:, None]
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        mask = mask_p[:, None] & mask_c[None, :]
        cnn = gelu(_dwconv(y_ptr, dw_ptr, dwb_ptr, rows, cols, mask_p, H, W, offs_c, mask_c, s_yc, s_yh, s_yw,
                            HAS_DWB, BLOCK_P, BLOCK_C))
        m = tl.load(m_ptr + _tile_offsets(rows, cols, offs_c, s_mc, s_mh, s_mw), mask=mask, other=0.0).to(tl.float32)
        out = m + g * (cnn - m)
        if HAS_RES:
            res = tl.load(r_ptr + _tile_offsets(rows, cols, offs_c, s_rc, s_rh, s_rw), mask=mask, other=0.0)
            out += res.to(tl.float32)
        tl.store(o_ptr + _tile_offsets(rows, cols, offs_c, s_oc, s_oh, s_ow), out.to(o_ptr.dtype.element_ty), mask=mask)


@jit
def _gated_fusion_bwd_gate_kernel(
    go_ptr, y_ptr, m_ptr, dm_ptr, dz_ptr, dh_ptr, pb_ptr, dw_ptr, dwb_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
    part_c_ptr, part_dw_ptr, part_b2_ptr,
    C, H, W, n_tiles,
    s_gb, s_gc, s_gh, s_gw, s_yb, s_yc, s_yh, s_yw, s_mb, s_mc, s_mh, s_mw, s_dmb, s_dmc, s_dmh, s_dmw,
    s_db, s_dc, s_dh, s_dw,
    HAS_DWB: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Writes dmamba, dz (conv pre-activation grad) and dh (gate hidden grad), the latter two into
    workspaces with y's strides (s_d*), and this tile's partial sums:
    part_c (3, B, n_tiles, C) = [d prompt_bias, d g2_weight, d dw_bias], part_dw (B, n_tiles, 9, C),
    part_b2 (B, n_tiles)."""
    b = tl.program_id(1).to(tl.int64)
    tile = b * n_tiles + tl.program_id(0)
    go_ptr += b * s_gb
    y_ptr += b * s_yb
    m_ptr += b * s_mb
    dm_ptr += b * s_dmb
    dz_ptr += b * s_db
    dh_ptr += b * s_db
    pb_ptr += b * C
    part_c_ptr += tile * C
    part_c_stride = tl.num_programs(1) * n_tiles * C
    part_dw_ptr += tile * 9 * C
    rows, cols, mask_p = _pixel_tile(H, W, BLOCK_P, BLOCK_W)
    pix = rows * s_yh + cols * s_yw

    g = _gate(y_ptr, w1_ptr, b1_ptr, pb_ptr, w2_ptr, b2_ptr, pix, mask_p, C, s_yc,
              HAS_B1, HAS_B2, BLOCK_P, BLOCK_N, DOT_PRECISION)
    dg = tl.zeros((BLOCK_P,), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        mask = mask_p[:, None] & mask_c[None, :]
        z = _dwconv(y_ptr, dw_ptr, dwb_ptr, rows, cols, mask_p, H, W, offs_c, mask_c, s_yc, s_yh, s_yw,
                    HAS_DWB, BLOCK_P, BLOCK_C)
        go = tl.load(go_ptr + _tile_offsets(rows, cols, offs_c, s_gc, s_gh, s_gw), mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + _tile_offsets(rows, cols, offs_c, s_mc, s_mh, s_mw), mask=mask, other=0.0).to(tl.float32)
        dg += tl.sum(go * (gelu(z) - m), axis=1)
        tl.store(dm_ptr + _tile_offsets(rows, cols, offs_c, s_dmc, s_dmh, s_dmw),
                 ((1.0 - g[:, None]) * go).to(dm_ptr.dtype.element_ty), mask=mask)
        dz = g[:, None] * go * gelu_grad(z)
        tl.store(dz_ptr + _tile_offsets(rows, cols, offs_c, s_dc, s_dh, s_dw), dz.to(dz_ptr.dtype.element_ty),
                 mask=mask)
        tl.store(part_c_ptr + 2 * part_c_stride + offs_c, tl.sum(dz, axis=0), mask=mask_c)
        for t in tl.static_range(9):
            tap = _load_tap(y_ptr, rows, cols, mask_p, t // 3 - 1, t % 3 - 1, H, W, offs_c, mask_c, s_yc, s_yh, s_yw)
            tl.store(part_dw_ptr + t * C + offs_c, tl.sum(dz * tap, axis=0), mask=mask_c)

    dlogit = dg * g * (1.0 - g)  # zero on pixels outside the image, since go is zero there
    tl.store(part_b2_ptr + tile, tl.sum(dlogit, axis=0))
    for n0 in range(0, C, BLOCK_N):
        h, offs_n, mask_n = _gate_hidden(y_ptr, w1_ptr, b1_ptr, pb_ptr, pix, mask_p, n0, C, s_yc,
                                         HAS_B1, BLOCK_P, BLOCK_N, DOT_PRECISION)
        w2 = tl.load(w2_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(part_c_ptr + part_c_stride + offs_n, tl.sum(dlogit[:, None] * gelu(h), axis=0), mask=mask_n)
        dh = dlogit[:, None] * w2[None, :] * gelu_grad(h)
        tl.store(dh_ptr + _tile_offsets(rows, cols, offs_n, s_dc, s_dh, s_dw), dh.to(dh_ptr.dtype.element_ty),
                 mask=mask_p[:, None] & mask_n[None, :])
        tl.store(part_c_ptr + offs_n, tl.sum(dh, axis=0), mask=mask_n)


@jit
def _gated_fusion_bwd_input_kernel(
    dz_ptr, dh_ptr, dy_ptr, dw_ptr, w1_ptr,
    C, H, W,
    s_db, s_dc, s_dh, s_dw, s_yb, s_yc, s_yh, s_yw,
    BLOCK_P: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dy = dh W1 + conv_transpose3x3(dz): the gate path as a tl.dot, the conv from dz's halo."""
    b = tl.program_id(1).to(tl.int64)
    dz_ptr += b * s_db
    dh_ptr += b * s_db
    dy_ptr += b * s_yb
    rows, cols, mask_p = _pixel_tile(H, W, BLOCK_P, BLOCK_W)
    for k0 in range(0, C, BLOCK_C):
        offs_k = k0 + tl.arange(0, BLOCK_C)
        mask_k = offs_k < C
        dy = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
        for n0 in range(0, C, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < C
            dh = tl.load(dh_ptr + _tile_offsets(rows, cols, offs_n, s_dc, s_dh, s_dw),
                         mask=mask_p[:, None] & mask_n[None, :], other=0.0)
            w1 = tl.load(w1_ptr + offs_n[:, None] * C + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :],
                         other=0.0)
            dy = tl.dot(dh, w1, dy, input_precision=DOT_PRECISION)
        for t in tl.static_range(9):
            w = tl.load(dw_ptr + offs_k * 9 + t, mask=mask_k, other=0.0).to(tl.float32)
            dy += _load_tap(dz_ptr, rows, cols, mask_p, 1 - t // 3, 1 - t % 3, H, W, offs_k, mask_k,
                            s_dc, s_dh, s_dw) * w[None, :]
        tl.store(dy_ptr + _tile_offsets(rows, cols, offs_k, s_yc, s_yh, s_yw), dy.to(dy_ptr.dtype.element_ty),
                 mask=mask_p[:, None] & mask_k[None, :])


# ----------------------------------------------------------------------------- launch code
MIN_DOT = 16  # tl.dot's smallest operand dimension on NVIDIA
# The interpreter runs programs one after another at a fixed cost each, so CPU tensors get few, big
# tiles: a whole small image, capped at these sizes.
INTERPRETER_MAX_PIXELS = 2048
INTERPRETER_MAX_CHANNELS = 128


@dataclass(frozen=True)
class LaunchConfig:
    """Tile: block_p pixels, as (block_p // block_w) rows of block_w columns. Channels go in blocks of
    block_n through the gate's tl.dot and of block_c through the depthwise conv, blend and stores.
    All powers of two; block_p, block_n and block_c >= 16 (tl.dot's minimum on NVIDIA)."""

    block_p: int
    block_w: int
    block_c: int
    block_n: int
    num_warps: int = 8

    def n_tiles(self, H: int, W: int) -> int:
        return triton.cdiv(H, self.block_p // self.block_w) * triton.cdiv(W, self.block_w)

    def launch_args(self) -> dict:
        return dict(BLOCK_P=self.block_p, BLOCK_W=self.block_w, BLOCK_C=self.block_c, BLOCK_N=self.block_n,
                    num_warps=self.num_warps)


def default_config(C: int, H: int, W: int, device: torch.device, dtype: torch.dtype,
                   backward: bool = False) -> LaunchConfig:
    """The tiles for a (B, C, H, W) problem on ``device`` in ``dtype`` (the forward's, or with
    ``backward`` the backward kernels')."""
    block_w = triton.next_power_of_2(W)
    if device.type != "cuda":
        block_p = max(min(triton.next_power_of_2(H) * block_w, INTERPRETER_MAX_PIXELS), MIN_DOT, block_w)
        block_c = min(max(triton.next_power_of_2(C), MIN_DOT), INTERPRETER_MAX_CHANNELS)
        return LaunchConfig(block_p=block_p, block_w=block_w, block_c=block_c, block_n=block_c)
    # Wide gate blocks for the tensor cores, dividing C where C is a multiple of 16 (no masked lanes);
    # float32 dots (3xTF32) hold more registers, so half as wide. The conv keeps nine shifted tiles in
    # flight: 16 channels keep it clear of register spills (checked with ptxas for sm_90, 8 warps).
    widest = 32 if dtype == torch.float32 else 64
    block_n = next((bn for bn in (64, 32, 16) if bn <= widest and C % bn == 0),
                   min(max(triton.next_power_of_2(C), MIN_DOT), widest))
    # The backward kernels hold more per pixel (the gate's recomputation and its gradients): at 128
    # pixels they spilled 40-576 B per thread, at 64 none (bench/compile_check.py, sm_90).
    block_p = 64 if backward else 128
    return LaunchConfig(block_p=block_p, block_w=min(block_w, block_p), block_c=16, block_n=block_n)


def _strides(t: Optional[torch.Tensor]):
    return t.stride() if t is not None else (0, 0, 0, 0)


def _flag_args(dw_bias, g1_bias, g2_bias):
    return dict(HAS_DWB=dw_bias is not None, HAS_B1=g1_bias is not None, HAS_B2=g2_bias is not None)


def gated_fusion_fwd(y, mamba, prompt_bias, dw_weight, dw_bias, g1_weight, g1_bias, g2_weight, g2_bias, residual,
                     config: Optional[LaunchConfig] = None) -> torch.Tensor:
    """Triton forward. The parameters are contiguous and in the compute dtype, which ``out`` takes; y, mamba
    and residual are read in their own dtypes and strides (the public wrapper ensures this)."""
    B, C, H, W = y.shape
    out = torch.empty_like(y, dtype=g1_weight.dtype)
    if out.numel() == 0:
        return out
    cfg = config or default_config(C, H, W, y.device, g1_weight.dtype)
    grid = (cfg.n_tiles(H, W), B)
    _gated_fusion_fwd_kernel[grid](
        y, mamba, residual if residual is not None else y, out, prompt_bias, dw_weight, dw_bias, g1_weight, g1_bias,
        g2_weight, g2_bias, C, H, W,
        *y.stride(), *mamba.stride(), *_strides(residual), *out.stride(),
        HAS_RES=residual is not None, **_flag_args(dw_bias, g1_bias, g2_bias),
        DOT_PRECISION=dot_precision(g1_weight.dtype), **cfg.launch_args(),
    )
    return out


def gated_fusion_bwd(grad_out, y, mamba, prompt_bias, dw_weight, dw_bias, g1_weight, g1_bias, g2_weight, g2_bias,
                     config: Optional[LaunchConfig] = None):
    """Gradients (y, mamba, prompt_bias, dw_weight, dw_bias, g1_weight, g1_bias, g2_weight, g2_bias), each in
    its input's dtype; bias gradients are returned even for absent biases (the autograd formula drops them)."""
    B, C, H, W = y.shape
    dtype = g1_weight.dtype
    cfg = config or default_config(C, H, W, y.device, dtype, backward=True)
    n_tiles = cfg.n_tiles(H, W)
    dy, dmamba = torch.empty_like(y), torch.empty_like(mamba)
    # Workspaces with y's strides in the compute dtype (dh feeds tl.dot and the dW1 GEMM), fully written.
    dz, dh = torch.empty_like(y, dtype=dtype), torch.empty_like(y, dtype=dtype)
    part_c = y.new_empty(3, B, n_tiles, C, dtype=torch.float32)
    part_dw = y.new_empty(B, n_tiles, 9, C, dtype=torch.float32)
    part_b2 = y.new_empty(B, n_tiles, dtype=torch.float32)
    if y.numel() > 0:
        grid = (n_tiles, B)
        precision = dot_precision(dtype)
        _gated_fusion_bwd_gate_kernel[grid](
            grad_out, y, mamba, dmamba, dz, dh, prompt_bias, dw_weight, dw_bias, g1_weight, g1_bias, g2_weight, g2_bias,
            part_c, part_dw, part_b2, C, H, W, n_tiles,
            *grad_out.stride(), *y.stride(), *mamba.stride(), *dmamba.stride(), *dz.stride(),
            **_flag_args(dw_bias, g1_bias, g2_bias),
            DOT_PRECISION=precision, **cfg.launch_args(),
        )
        _gated_fusion_bwd_input_kernel[grid](
            dz, dh, dy, dw_weight, g1_weight, C, H, W, *dz.stride(), *dy.stride(),
            DOT_PRECISION=precision, **cfg.launch_args(),
        )
    d_prompt_bias = part_c[0].sum(1)
    return (
        dy, dmamba, d_prompt_bias.to(dtype),
        part_dw.sum((0, 1)).t().contiguous().view(C, 1, 3, 3).to(dtype), part_c[2].sum((0, 1)).to(dtype),
        torch.einsum("bnhw,bkhw->nk", dh, y.to(dtype)).contiguous(), d_prompt_bias.sum(0).to(dtype),
        part_c[1].sum((0, 1)).view(1, C).to(dtype), part_b2.sum().view(1).to(dtype),
    )



KERNELS = {"gated_fusion_fwd": _gated_fusion_fwd_kernel, "gated_fusion_bwd_gate": _gated_fusion_bwd_gate_kernel,
           "gated_fusion_bwd_input": _gated_fusion_bwd_input_kernel}
