"""Depthwise causal 1-D convolution (the conv of Mamba's mixer)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_ref(x, weight, bias=None, activation=None):
    """x (b, d, l); weight (d, w); bias (d,); activation None | "silu" -> (b, d, l)."""
    w = weight.shape[1]
    out = F.conv1d(F.pad(x, (w - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
    return F.silu(out) if activation in ("silu", "swish") else out


def causal_conv1d(x, weight, bias=None, activation=None, backend: str = "auto"):
    return causal_conv1d_ref(x, weight, bias, activation)
