"""The MoE's C loops for CPU tensors (``csrc/moe_cpu.c`` through ctypes): top-K routing and the
K-way combination of the expert outputs, forward and backward. PyTorch's CPU ``log`` and
``logaddexp`` run scalar, and a (P, 6) top-2 pays mostly small-op overhead; in C both are one
vectorised pass over the rows. Everything is float32 and contiguous on the C side, so the resolver
sends float64 to the PyTorch path.
"""
from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from .. import _native

LIBRARY = "moe_cpu"
TOPK_MAX_N = 64  # TOPK_MAX_N in csrc/moe_cpu.c: the widest row the C top-K takes

_I64, _INT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
# (P, N, K, threads, logits, w, idx)
_TOPK_FWD = [_I64, _I64, _I64, _INT, _PTR, _PTR, _PTR]
# (P, C, K, lse, threads, out, w, y)
_COMBINE_FWD = [_I64, _I64, _I64, _INT, _INT, _PTR, _PTR, _PTR]
# (P, C, K, lse, threads, dy, out, w, dout, dw)
_COMBINE_BWD = [_I64, _I64, _I64, _INT, _INT, _PTR, _PTR, _PTR, _PTR, _PTR]


def library() -> ctypes.CDLL:
    """The loaded library with its C signatures declared (the resolver picked "native", so it builds)."""
    lib = _native.load(LIBRARY)
    lib.topk_softmax_fwd.argtypes = _TOPK_FWD
    lib.combine_fwd.argtypes = _COMBINE_FWD
    lib.combine_bwd.argtypes = _COMBINE_BWD
    return lib


def topk_softmax_fwd(logits: Tensor, k: int):
    """logits (P, N <= TOPK_MAX_N) float32, float16 or bfloat16 -> (weights (P, k) logits' dtype,
    indices (P, k) int64). Those dtypes convert to float32 exactly, so the float32 selection picks
    what theirs would; float64 logits never come here (``_backend.OPS``: the PyTorch path selects in
    float64). The softmax runs in float32 and is rounded to the logits' dtype."""
    P, N = logits.shape
    s = logits.float().contiguous()
    weights, indices = s.new_empty(P, k), torch.empty(P, k, dtype=torch.int64)
    library().topk_softmax_fwd(P, N, k, torch.get_num_threads(), *map(_native.ptr, (s, weights, indices)))
    return weights.to(logits.dtype), indices


def combine_fwd(out: Tensor, weights: Tensor, combine: str) -> Tensor:
    """out (K, P, C) float32, weights (P, K) -> float32 y (P, C)."""
    K, P, C = out.shape
    # Named, so the contiguous float32 copies (if any) outlive the call that reads them.
    out, w, y = out.contiguous(), weights.float().contiguous(), out.new_empty(P, C)
    library().combine_fwd(P, C, K, combine != "sum", torch.get_num_threads(), *map(_native.ptr, (out, w, y)))
    return y


def combine_bwd(dy: Tensor, out: Tensor, weights: Tensor, combine: str):
    """out (K, P, C) float32 -> (dout (K, P, C) float32, dweights (P, K) float32)."""
    K, P, C = out.shape
    dy, out, w = dy.float().contiguous(), out.contiguous(), weights.float().contiguous()
    dout, dweights = out.new_empty(K, P, C), out.new_empty(P, K)
    library().combine_bwd(P, C, K, combine != "sum", torch.get_num_threads(),
                          *map(_native.ptr, (dy, out, w, dout, dweights)))
    return dout, dweights
