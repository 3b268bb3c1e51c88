"""Depthwise causal 1-D convolution (the conv of Mamba's mixer), with the signature of causal_conv1d's
``causal_conv1d_fn``.

Implementations, chosen by ``_backend.resolve_impl``: ``"extension"`` (``backend="auto"`` on CUDA
uses the ``causal_conv1d`` package's kernel when it imports; imported lazily, never on CPU), else
``"torch"``, the grouped ``F.conv1d`` of ``reference.py``. There is no Triton version: that conv is
already a single fused library call, so ``backend="triton"`` runs it too.
"""
from __future__ import annotations

from .._backend import OPS, optional_op, resolve_impl
from .reference import ACTIVATIONS, _check_args, causal_conv1d_ref

__all__ = ["causal_conv1d", "causal_conv1d_ref", "ACTIVATIONS"]

CAUSAL_CONV1D_FN = OPS["causal_conv1d"].extension


def causal_conv1d(x, weight, bias=None, activation=None, backend: str = "auto"):
    """Depthwise causal conv, same contract as ``causal_conv1d_ref``.

    ``backend="auto"`` on float32/float16/bfloat16 CUDA tensors runs the causal_conv1d package's
    kernel when installed (it takes no float64); otherwise (and for "triton"/"torch") the grouped
    ``F.conv1d``, which takes every floating dtype in its own precision.
    """
    _check_args(x, weight, bias, activation)
    if resolve_impl("causal_conv1d", x.device, x.dtype, backend) == "extension":
        # By keyword: causal_conv1d_fn's fourth parameter is seq_idx.
        return optional_op(*CAUSAL_CONV1D_FN)(x, weight, bias, activation=activation)
    return causal_conv1d_ref(x, weight, bias, activation)
