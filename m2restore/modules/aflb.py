"""AFLB: AdaIR's adaptive frequency learning block, applied at the start of each decoder level.

forward(image (B, 3, H0, W0), features (B, C, H, W)) -> (B, C, H, W):

    f          = conv3×3(3→C)(resize(image, (H, W)))
    t          = sigmoid(1×1(C/8→2)(GELU(1×1(C→C/8)(GAP(f)))))            two thresholds per image
    low, high  = |ifft(F·M)|, |ifft(F·(1−M))|,  F = fft2(f, norm="forward"), M a centred box
    low, high  = CrossAttn(low, features), CrossAttn(high, features)     q from the part
    agg        = proj1×1(low·SpatialGate(high) + high·ChannelGate(low))
    out        = a ⊙ CrossAttn(features, agg) + b ⊙ features            a init 0, b init 1

The box half-extent (``box`` / ``M2RestoreConfig.aflb_box``, docs/design.md#resolved-ambiguities): ``"half"`` (default) is
``n_h = int(t·h/2)`` (resp. w), so the low/high split exists at every size. ``"adair"`` is AdaIR's
and the authors' ``int((h // 128)·t)``: since t < 1 it is empty for every map under 256 pixels
(low = 0, high = |f|), so below a 512-pixel input all three AFLBs see no low band (the level-3
AFLB, at 1/8 resolution, up to a 2048-pixel input). Because the box edge is an integer, no
gradient reaches the threshold MLP (as in AdaIR).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .statistics import pixel_amax, pixel_mean
from .transformer import channel_attention


class CrossAttention(nn.Module):
    """Channel cross-attention: q from ``x``, k and v from ``y`` (1×1 then depthwise 3×3 each)."""

    def __init__(self, dim: int, heads: int, bias: bool = False):
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.q = nn.Conv2d(dim, dim, 1, bias=bias)
        self.q_dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=bias)
        self.kv = nn.Conv2d(dim, 2 * dim, 1, bias=bias)
        self.kv_dwconv = nn.Conv2d(2 * dim, 2 * dim, 3, padding=1, groups=2 * dim, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        q = self.q_dwconv(self.q(x))
        k, v = self.kv_dwconv(self.kv(y)).chunk(2, dim=1)
        return self.project_out(channel_attention(q, k, v, self.heads, self.temperature))


class SpatialGate(nn.Module):
    """(B, C, H, W) -> (B, 1, H, W) weights: sigmoid(conv k×k on [max over C ; mean over C])."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))


class ChannelGate(nn.Module):
    """(B, C, H, W) -> (B, C, 1, 1) weights: sigmoid(mlp(avg-pool) + mlp(max-pool)), mlp C→C/r→C."""

    def __init__(self, dim: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, dim // reduction)
        self.mlp = nn.Sequential(nn.Conv2d(dim, hidden, 1, bias=False), nn.ReLU(),
                                 nn.Conv2d(hidden, dim, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.mlp(pixel_mean(x)) + self.mlp(pixel_amax(x)))


class FrequencyRefine(nn.Module):
    """proj1×1(low·SpatialGate(high) + high·ChannelGate(low))."""

    def __init__(self, dim: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        self.spatial_gate = SpatialGate(kernel_size)
        self.channel_gate = ChannelGate(dim, reduction)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        return self.proj(low * self.spatial_gate(high) + high * self.channel_gate(low))


def box_half_extent(thresholds: torch.Tensor, size: int, box: str = "half") -> torch.Tensor:
    """thresholds (B,) in (0, 1) -> (B,) half-extents of the box along a side of ``size`` pixels:
    ``floor(t·size/2)`` for ``box="half"``, ``floor((size // 128)·t)`` for ``box="adair"``."""
    if box == "half":
        return torch.floor(thresholds * (size / 2))
    if box == "adair":
        return torch.floor((size // 128) * thresholds)
    raise ValueError(f"box must be 'half' or 'adair', got {box!r}")


def box_mask(thresholds: torch.Tensor, h: int, w: int, box: str = "half") -> torch.Tensor:
    """thresholds (B, 2) in (0, 1) -> (B, 1, h, w) float mask of the low-frequency box, in
    unshifted fft2 layout: in the fftshift-ed spectrum, rows [h//2 − n_h, h//2 + n_h) by columns
    [w//2 − n_w, w//2 + n_w), n_h, n_w from :func:`box_half_extent` with t_0 and t_1."""
    half_h = box_half_extent(thresholds[:, 0], h, box)[:, None]
    half_w = box_half_extent(thresholds[:, 1], w, box)[:, None]
    rows = torch.arange(h, device=thresholds.device) - h // 2
    cols = torch.arange(w, device=thresholds.device) - w // 2
    in_rows = (rows >= -half_h) & (rows < half_h)  # (B, h)
    in_cols = (cols >= -half_w) & (cols < half_w)  # (B, w)
    shifted = (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)
    return torch.fft.ifftshift(shifted, dim=(-2, -1)).to(thresholds.dtype)


class AFLB(nn.Module):
    """Adaptive frequency learning block: forward(image (B, 3, H0, W0), features (B, C, H, W)).

    ``box``: the box rule of :func:`box_half_extent` (``"half"`` or the authors' ``"adair"``)."""

    def __init__(self, dim: int, heads: int = 4, bias: bool = False, rate_reduction: int = 8,
                 channel_reduction: int = 16, spatial_kernel: int = 7, box: str = "half"):
        super().__init__()
        if box not in ("half", "adair"):
            raise ValueError(f"box must be 'half' or 'adair', got {box!r}")
        self.box = box
        self.image_conv = nn.Conv2d(3, dim, 3, padding=1, bias=False)
        self.rate_conv = nn.Sequential(
            nn.Conv2d(dim, max(1, dim // rate_reduction), 1, bias=False), nn.GELU(),
            nn.Conv2d(max(1, dim // rate_reduction), 2, 1, bias=False),
        )
        self.cross_low = CrossAttention(dim, heads, bias)
        self.cross_high = CrossAttention(dim, heads, bias)
        self.refine = FrequencyRefine(dim, channel_reduction, spatial_kernel)
        self.cross_agg = CrossAttention(dim, heads, bias)
        self.a = nn.Parameter(torch.zeros(dim, 1, 1))
        self.b = nn.Parameter(torch.ones(dim, 1, 1))

    # Runs eagerly under torch.compile: inductor cannot trace the backward of the complex FFT
    # product (it views complex as float with a non-unit stride), and the box edge depends on data.
    @torch.compiler.disable
    def split_frequencies(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f (B, C, H, W) -> (low, high), magnitudes of the inverse FFTs inside / outside the box."""
        h, w = f.shape[-2:]
        thresholds = torch.sigmoid(self.rate_conv(pixel_mean(f)))[:, :, 0, 0]
        # Half-precision FFTs are missing on CPU and limited to powers of two on CUDA: go to float32.
        work = f if f.dtype in (torch.float32, torch.float64) else f.float()
        mask = box_mask(thresholds, h, w, self.box).to(work.dtype)
        low = torch.fft.ifft2(torch.fft.fft2(work, norm="forward") * mask, norm="forward")
        # ifft2(F·(1−M)) = f − ifft2(F·M): one inverse transform serves both parts.
        return low.abs().to(f.dtype), (work - low).abs().to(f.dtype)

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        f = self.image_conv(F.interpolate(image, size=features.shape[-2:], mode="bilinear", align_corners=False))
        low, high = self.split_frequencies(f)
        low = self.cross_low(low, features)
        high = self.cross_high(high, features)
        agg = self.refine(low, high)
        return self.a * self.cross_agg(features, agg) + self.b * features
