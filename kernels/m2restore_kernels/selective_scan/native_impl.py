"""The selective scan's C loop for CPU tensors (``csrc/selective_scan_cpu.c`` through ctypes).

The recurrence as one fused loop, channels in parallel, each channel's states in registers; the
backward recomputes each chunk of NATIVE_CHUNK states from checkpoints and runs the adjoint
recurrence backwards, like the Triton kernels. The C side reads float32, contiguous tensors.
"""
from __future__ import annotations

import ctypes
import functools
from typing import Optional

import torch
from torch import Tensor

from .. import _native
from .reference import HEAD_AXIS, group_sizes, lifted

LIBRARY = "selective_scan_cpu"
NATIVE_CHUNK = 64  # steps per checkpoint: the backward's per-thread buffer is (NATIVE_CHUNK + 1, n)


class _ScanShape(ctypes.Structure):
    """``scan_shape`` of csrc/selective_scan_cpu.c, field for field."""
    _fields_ = [(f, ctypes.c_int64) for f in ("b", "d", "l", "n", "gB", "gC", "chunk", "nck", "sBb", "sBg", "sBt",
                                               "sCb", "sCg", "sCt", "nB", "nC")] + \
               [(f, ctypes.c_int) for f in ("has_D", "has_z", "has_bias", "softplus")]


_PTR = ctypes.POINTER(_ScanShape), ctypes.c_int
# (shape, threads, u, delta, A, Bt, Ct, D, z, bias, out, last, ckpt)
_SCAN_FWD = [*_PTR] + [ctypes.c_void_p] * 11
# (shape, threads, u, delta, A, Bt, Ct, D, z, bias, ckpt, dout, dlast,
#  du, ddelta, dz, dA_part, dD_part, dbias_part, dB_part, dC_part)
_SCAN_BWD = [*_PTR] + [ctypes.c_void_p] * 19


# (update_shape as int64s: b, h, p, n, g, strides of state, x, dt, z, out, A, B, C, D, bias, then the
# flags has_D, has_z, has_bias, has_idx, softplus; threads; state, x, dt, A, B, C, D, z, bias, idx, out)
_STATE_UPDATE = [_native.INT64S, ctypes.c_int] + [ctypes.c_void_p] * 11


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    """The loaded library with its C signatures declared (the resolver picked "native", so it builds)."""
    lib = _native.load(LIBRARY)
    lib.scan_fwd.argtypes = _SCAN_FWD
    lib.scan_bwd.argtypes = _SCAN_BWD
    lib.state_update.argtypes = _STATE_UPDATE
    return lib


# The tensors whose strides update_shape holds, in its order (out is laid out like x), each with its
# single-head rank and nheads axis.
_UPDATE_STRIDES = tuple(map(HEAD_AXIS.get, ("state", "x", "dt", "z", "x", "A", "B", "C", "D", "dt_bias")))


def selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices) -> Tensor:
    """One step on the arguments as the caller gave them, each in the multi-head form or its
    single-head one (``reference.check_state_update_args`` checked them): a missing nheads axis is
    passed to C as a stride 0, not made a view. Any strides; state float32, written in place (the
    caller checks its dtype); the rest converted to float32 where they are not.
    -> out shaped like x, float32."""
    _, h, p, n = lifted("state", state.shape, 1)
    b = x.shape[0]
    xf, dtf, Af, Bf, Cf, Df, zf, biasf = ins = [t if t is None or t.dtype == torch.float32 else t.float()
                                                for t in (x, dt, A, B, C, D, z, dt_bias)]
    idx = None if state_batch_indices is None else state_batch_indices.to(torch.int64).contiguous()
    out = torch.empty(x.shape)
    strides = []
    for (rank, axis), t in zip(_UPDATE_STRIDES, (state, xf, dtf, zf, out, Af, Bf, Cf, Df, biasf)):
        s = t.stride() if t is not None else (0,) * rank
        strides += (*s[:axis], 0, *s[axis:]) if len(s) == rank else s
    shape = _native.int64s(b, h, p, n, lifted("B", B.shape, 1)[1], *strides, D is not None, z is not None,
                           dt_bias is not None, idx is not None, dt_softplus)
    _library().state_update(shape, _native.threads_for(b * h * p * n), *map(_native.ptr, [state, *ins, idx, out]))
    return out


def _layout(X: Tensor, b: int, d: int, l: int, n: int) -> tuple:
    """(groups, strides per batch, group and step, elements) of :func:`_state_minor`'s B or C."""
    if X.dim() == 2:  # time-invariant: every channel its own row, the same at every batch and step
        return d, 0, n, 0, d * n
    g = group_sizes(X, d)[0]
    return g, g * l * n, l * n, n, b * g * l * n


def _native_shape(u, A, B, C, D, z, delta_bias, delta_softplus) -> _ScanShape:
    b, d, l = u.shape
    n = A.shape[1]
    gB, *sB, nB = _layout(B, b, d, l, n)
    gC, *sC, nC = _layout(C, b, d, l, n)
    return _ScanShape(b, d, l, n, gB, gC, NATIVE_CHUNK, -(-l // NATIVE_CHUNK), *sB, *sC, nB, nC,
                      D is not None, z is not None, delta_bias is not None, delta_softplus)


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.to(torch.float32).contiguous()


def _state_minor(X: Tensor, l: int) -> Tensor:
    """B or C, (b, n, l) or (b, g, n, l) -> (b, g, l, n) float32: one step's states adjacent;
    time-invariant (d, n) stays (d, n)."""
    if X.dim() == 2:
        return _f32(X)
    b, g, n = X.shape[0], X.shape[1] if X.dim() == 4 else 1, X.shape[-2]
    return X.reshape(b, g, n, l).transpose(-1, -2).to(torch.float32).contiguous()


def _native_inputs(u, delta, A, B, C, D, z, delta_bias, *extra) -> list:
    """The arguments both C entry points read, in their order: float32, contiguous, B and C state-minor;
    ``extra`` tensors (or None) follow. Kept in a list so every copy outlives the call."""
    l = u.shape[2]
    return [_f32(t) for t in (u, delta, A)] + [_state_minor(B, l), _state_minor(C, l)] + \
           [_f32(t) for t in (D, z, delta_bias, *extra)]


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    shape = _native_shape(u, A, B, C, D, z, delta_bias, delta_softplus)
    b, d, l, n = shape.b, shape.d, shape.l, shape.n
    ins = _native_inputs(u, delta, A, B, C, D, z, delta_bias)
    out = torch.empty(b, d, l)
    last, ckpt = torch.empty(b, d, n), torch.empty(b, shape.nck, d, n)
    _library().scan_fwd(
        ctypes.byref(shape), ctypes.c_int(torch.get_num_threads()), *map(_native.ptr, ins + [out, last, ckpt]))
    return out.to(u.dtype), last, ckpt


def selective_scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, ckpt, delta_softplus):
    shape = _native_shape(u, A, B, C, D, z, delta_bias, delta_softplus)
    b, d, l, n = shape.b, shape.d, shape.l, shape.n
    threads = torch.get_num_threads()
    ins = _native_inputs(u, delta, A, B, C, D, z, delta_bias, ckpt, dout, dlast)
    du, ddelta = torch.empty(b, d, l), torch.empty(b, d, l)
    dz = torch.empty(b, d, l) if z is not None else None
    dA_part, dD_part, dbias_part = torch.empty(b, d, n), torch.empty(b, d), torch.empty(b, d)
    # Per-thread partial sums of the gradients every channel of a group adds to.
    dB_part, dC_part = torch.zeros(threads, shape.nB), torch.zeros(threads, shape.nC)
    _library().scan_bwd(
        ctypes.byref(shape), ctypes.c_int(threads),
        *map(_native.ptr, ins + [du, ddelta, dz, dA_part, dD_part, dbias_part, dB_part, dC_part]))

    def per_group(part: Tensor, X: Tensor) -> Tensor:
        if X.dim() == 2:
            return part.sum(0).view(X.shape).to(X.dtype)
        g = X.shape[1] if X.dim() == 4 else 1
        return part.sum(0).view(b, g, l, n).transpose(-1, -2).reshape(X.shape).to(X.dtype).contiguous()

    return (du.to(u.dtype), ddelta.to(delta.dtype), dA_part.sum(0).to(A.dtype), per_group(dB_part, B),
            per_group(dC_part, C), dD_part.sum(0).to(D.dtype) if D is not None else u.new_empty(0),
            dz.to(z.dtype) if z is not None else u.new_empty(0),
            dbias_part.sum(0).to(delta_bias.dtype) if delta_bias is not None else u.new_empty(0))

