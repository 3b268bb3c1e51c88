"""The MoE's C loops for CPU tensors (``csrc/moe_cpu.c`` through ctypes): top-K routing and the
K-way combination of the expert outputs, forward and backward. PyTorch's CPU ``log`` and
``logaddexp`` run scalar, and a (P, 6) top-2 pays mostly small-op overhead; in C both are one
vectorised pass over the rows. Everything is float32 and contiguous on the C side, so the resolver
sends float64 to the PyTorch path.
"""
from __future__ import annotations

import ctypes
import sys

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


# Large fresh CPU buffers: a first touch page-faults every 4 KiB page, about 1 ms per MB on the VM
# of bench/RESULTS.md (a 19 MB buffer: 18 ms to fill fresh, 2.4 ms with huge pages). Advising the
# kernel to back a buffer with transparent huge pages (where THP is "madvise" or "always") faults
# it in 2 MiB at a time. Advice only: where the kernel ignores it, nothing changes.
_HUGE_PAGE = 1 << 21
_MADV_HUGEPAGE = 14
_LIBC = None
if sys.platform.startswith("linux"):
    try:
        _LIBC = ctypes.CDLL(None)
        _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        _LIBC = None


def empty(*shape: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.empty``; on a Linux CPU, a buffer of 4 MiB or more is advised onto huge pages before
    anything touches it."""
    t = torch.empty(*shape, dtype=dtype, device=device)
    if _LIBC is not None and t.device.type == "cpu" and t.numel() * t.element_size() >= 2 * _HUGE_PAGE:
        start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        end = (t.data_ptr() + t.numel() * t.element_size()) // _HUGE_PAGE * _HUGE_PAGE
        if end > start:
            _LIBC.madvise(start, end - start, _MADV_HUGEPAGE)
    return t


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
    out, w, y = out.contiguous(), weights.float().contiguous(), empty(P, C, dtype=out.dtype, device=out.device)
    library().combine_fwd(P, C, K, combine != "sum", torch.get_num_threads(), *map(_native.ptr, (out, w, y)))
    return y


def combine_bwd(dy: Tensor, out: Tensor, weights: Tensor, combine: str):
    """out (K, P, C) float32 -> (dout (K, P, C) float32, dweights (P, K) float32)."""
    K, P, C = out.shape
    dy, out, w = dy.float().contiguous(), out.contiguous(), weights.float().contiguous()
    dout, dweights = empty(K, P, C, dtype=out.dtype, device=out.device), out.new_empty(P, K)
    library().combine_bwd(P, C, K, combine != "sum", torch.get_num_threads(),
                          *map(_native.ptr, (dy, out, w, dout, dweights)))
    return dout, dweights
