"""Depthwise causal 1-D convolution (the conv of Mamba's mixer), with the signature of causal_conv1d's
``causal_conv1d_fn``.

On CUDA, ``backend="auto"`` uses the ``causal_conv1d`` package's kernel when it imports (imported
lazily, never on CPU); everywhere else one grouped ``F.conv1d`` over the left-padded input, which
is already a single fused library call, so there is no Triton version.
"""
from __future__ import annotations


import torch.nn.functional as F
from torch import Tensor

from ._backend import extension_op, resolve_backend

ACTIVATIONS = (None, "silu", "swish")


def _check_inputs(x: Tensor, weight: Tensor, bias, activation):
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
    """
    _check_inputs(x, weight, bias, activation)
    w = weight.shape[1]
    out = F.conv1d(F.pad(x, (w - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
    return F.silu(out) if activation in ("silu", "swish") else out


CAUSAL_CONV1D_FN = ("causal_conv1d", "causal_conv1d_fn")


def causal_conv1d(x, weight, bias=None, activation=None, backend: str = "auto"):
    """Depthwise causal conv, same contract as ``causal_conv1d_ref``.

    ``backend="auto"`` on CUDA tensors runs the causal_conv1d package's kernel when installed;
    otherwise (and for "triton"/"torch") the grouped ``F.conv1d``.
    """
    _check_inputs(x, weight, bias, activation)
    resolve_backend(backend, x.device)  # validates the backend name
    package_fn = extension_op(backend, x.device, *CAUSAL_CONV1D_FN)
    if package_fn is not None:
        return package_fn(x, weight, bias, activation)
    return causal_conv1d_ref(x, weight, bias, activation)
