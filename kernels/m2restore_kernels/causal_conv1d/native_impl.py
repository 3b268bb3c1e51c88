"""The causal conv's decode step for CPU tensors (``csrc/causal_conv1d_cpu.c`` through ctypes): one
pass over blocks of channels that reads the window from the cache, writes the outputs and updates
the cache in place (any width and number of steps), where the PyTorch path pays a gather, a
concatenation, a conv and a write-back of small tensors per step. float32 inside; the cache itself
must be float32.
"""
from __future__ import annotations

import ctypes
import functools
from typing import Optional

import torch
from torch import Tensor

from .. import _native

LIBRARY = "causal_conv1d_cpu"


# (conv_update_shape as int64s: b, d, l, w, S, strides of x, out, conv_state, weight, bias, then the flags
# has_bias, silu, has_seqlens, has_idx; threads; x, state, weight, bias, seqlens, idx, out)
_CONV_UPDATE = [_native.INT64S, ctypes.c_int] + [ctypes.c_void_p] * 7


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    """The loaded library with its C signature declared (the resolver picked "native", so it builds)."""
    lib = _native.load(LIBRARY)
    lib.conv_update.argtypes = _CONV_UPDATE
    return lib


def causal_conv1d_update(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor], activation,
                         cache_seqlens: Optional[Tensor], conv_state_indices: Optional[Tensor]) -> Tensor:
    """x (b, d) (one step: its seqlen axis is passed to C as a stride, not made a view) or (b, d, l),
    any strides and float dtype; conv_state (slots, d, S) float32, updated in place; weight (d, w);
    bias (d,) -> out shaped like x, float32 (arguments checked by the caller)."""
    b, d, l = x.shape if x.dim() == 3 else (*x.shape, 1)
    xf = x if x.dtype == torch.float32 else x.float()
    wf = weight if weight.dtype == torch.float32 else weight.float()
    bf = bias if bias is None or bias.dtype == torch.float32 else bias.float()
    seqlens = None if cache_seqlens is None else cache_seqlens.to(torch.int64).contiguous()
    idx = None if conv_state_indices is None else conv_state_indices.to(torch.int64).contiguous()
    out = torch.empty(x.shape)
    x_strides, out_strides = (*xf.stride(), 0)[:3], (*out.stride(), 0)[:3]  # (b, d): a 0 for the step axis
    shape = _native.int64s(b, d, l, weight.shape[1], conv_state.shape[2], *x_strides, *out_strides,
                           *conv_state.stride(), *wf.stride(), bf.stride(0) if bf is not None else 0,
                           bias is not None, activation in ("silu", "swish"), seqlens is not None, idx is not None)
    _library().conv_update(shape, _native.threads_for(b * d * (weight.shape[1] + l)),
                           *map(_native.ptr, (xf, conv_state, wf, bf, seqlens, idx, out)))
    return out
