"""Restormer's building blocks: channel LayerNorm, MDTA, GDFN, the transformer block, resampling.

All tensors are images (B, C, H, W) of any floating dtype.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .statistics import normalized_gram


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of every pixel, with weight and bias (Restormer's "WithBias")."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused layer_norm over a channels-last view; the result keeps channels-last strides,
        # which the following 1×1 and depthwise convolutions accept as they are.
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


def channel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                      temperature: torch.Tensor) -> torch.Tensor:
    """Transposed (C×C per head) attention of Restormer's MDTA and AdaIR's cross-attention.

    q, k, v (B, C, H, W); temperature (heads, 1, 1). q and k are L2-normalised along the pixels, so
    the cost is linear in H·W. The pixel reduction is :func:`normalized_gram`, which the tiles of one
    image share.
    """
    b, c, h, w = q.shape
    attn = torch.softmax(normalized_gram(q, k, heads) * temperature, dim=-1)
    return (attn @ v.reshape(b, heads, c // heads, h * w)).reshape(b, c, h, w)


class MDTA(nn.Module):
    """Multi-Dconv-head transposed attention: 1×1 to q,k,v, depthwise 3×3, channel attention, 1×1."""

    def __init__(self, dim: int, heads: int, bias: bool = False):
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Conv2d(dim, 3 * dim, 1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(3 * dim, 3 * dim, 3, padding=1, groups=3 * dim, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        return self.project_out(channel_attention(q, k, v, self.heads, self.temperature))


class GDFN(nn.Module):
    """Gated-Dconv feed-forward: 1×1 to 2·hidden, depthwise 3×3, gelu(a)·b, 1×1 back."""

    def __init__(self, dim: int, expansion: float = 2.66, bias: bool = False):
        super().__init__()
        hidden = int(dim * expansion)
        self.project_in = nn.Conv2d(dim, 2 * hidden, 1, bias=bias)
        self.dwconv = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.project_out.in_channels
        # Each half runs its own 1×1 and depthwise conv (same weights, same result), so the gate
        # multiplies two dense tensors. Chunking the 2·hidden-channel output instead hands gelu and the
        # product strided channel slices of a channels-last tensor, which PyTorch's CPU kernels run
        # 2-4× slower (timings in bench/RESULTS.md, CPU section).
        a, b = (self._dwconv_half(x, part) for part in (slice(0, hidden), slice(hidden, 2 * hidden)))
        return self.project_out(F.gelu(a) * b)

    def _dwconv_half(self, x: torch.Tensor, part: slice) -> torch.Tensor:
        """dwconv(project_in(x)) for the output channels ``part`` only."""
        pin, dw = self.project_in, self.dwconv
        z = F.conv2d(x, pin.weight[part], None if pin.bias is None else pin.bias[part])
        return F.conv2d(z, dw.weight[part], None if dw.bias is None else dw.bias[part], padding=1,
                        groups=part.stop - part.start)


class TransformerBlock(nn.Module):
    """x += MDTA(LN(x)); x += GDFN(LN(x))."""

    def __init__(self, dim: int, heads: int, expansion: float = 2.66, bias: bool = False, eps: float = 1e-5):
        super().__init__()
        self.norm1 = LayerNorm2d(dim, eps)
        self.attn = MDTA(dim, heads, bias)
        self.norm2 = LayerNorm2d(dim, eps)
        self.ffn = GDFN(dim, expansion, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last (a no-op once the stream is): the LayerNorm's channel view is then contiguous,
        # no transposing copy, and the residual adds meet one layout (bench/RESULTS.md, CPU section).
        x = x.contiguous(memory_format=torch.channels_last)
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class Downsample(nn.Sequential):
    """(B, C, H, W) -> (B, 2C, H/2, W/2): conv3×3 C→C/2, then PixelUnshuffle(2)."""

    def __init__(self, dim: int):
        super().__init__(nn.Conv2d(dim, dim // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))


class Upsample(nn.Sequential):
    """(B, C, H, W) -> (B, C/2, 2H, 2W): conv3×3 C→2C, then PixelShuffle(2)."""

    def __init__(self, dim: int):
        super().__init__(nn.Conv2d(dim, 2 * dim, 3, padding=1, bias=False), nn.PixelShuffle(2))
