"""Plain PyTorch reference of the causal conv, which is also its PyTorch path: one grouped
``F.conv1d`` over the left-padded input is already a single fused library call."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = (None, "silu", "swish")


def _check_args(x: Tensor, weight: Tensor, bias, activation):
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, dim, seqlen), got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"weight must be (dim={x.shape[1]}, width), got shape {tuple(weight.shape)}")
    if bias is not None and bias.shape != (x.shape[1],):
        raise ValueError(f"bias must be (dim={x.shape[1]},), got shape {tuple(bias.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def causal_conv1d_ref(x, weight, bias=None, activation=None):
    """x (b, d, l); weight (d, w); bias (d,); activation None | "silu" | "swish" -> (b, d, l).

    out[:, c, t] = act(bias[c] + sum_k weight[c, k] * x[:, c, t - (w - 1) + k]), zeros before t = 0.
    Any floating dtype, computed in it: x, weight and bias in one dtype, or any under autocast,
    which computes in its own (``F.conv1d``'s rule). NaN and infinities are not masked: one in
    x[:, c, t] reaches out[:, c, t:t + w].
    """
    _check_args(x, weight, bias, activation)
    w = weight.shape[1]
    out = F.conv1d(F.pad(x, (w - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
    return F.silu(out) if activation in ("silu", "swish") else out
