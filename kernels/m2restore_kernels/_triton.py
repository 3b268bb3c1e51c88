"""Triton, imported once for every op, and the device functions the ops share.

Triton is Linux-only: without it the package still imports and runs its PyTorch paths
(``_backend.resolve_impl`` never picks Triton then), so kernels are decorated with ``jit``, which
is a no-op when triton is missing.
"""
import os

import torch

from ._backend import interpreter_on

FP32_DOT_PRECISIONS = ("ieee", "tf32x3", "tf32")

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

jit = triton.jit if triton is not None else (lambda fn: fn)


@jit
def gelu(x):
    """Exact (erf) GELU, as torch's default ``F.gelu``."""
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@jit
def gelu_grad(x):
    """d GELU(x) / dx = Phi(x) + x phi(x)."""
    return 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision`` for operands of ``dtype``.

    float32 follows torch's matmul switch: by default ("highest") three TF32 products per dot
    ("tf32x3"), float32-level error on the tensor cores, where an "ieee" dot falls back to FMA loops
    many times slower (bench/RESULTS.md); plain "tf32" once
    ``torch.set_float32_matmul_precision("high")`` allows TF32, as cuBLAS then does.
    ``M2RESTORE_FP32_DOT=ieee|tf32x3|tf32`` overrides that (the parity tests run "ieee", as docs/design.md#tolerances
    asks). The interpreter computes every dot in IEEE float32. Other dtypes ignore all of this.
    """
    if dtype != torch.float32 or interpreter_on():
        return "ieee"
    forced = os.environ.get("M2RESTORE_FP32_DOT")
    if forced:
        if forced not in FP32_DOT_PRECISIONS:
            raise ValueError(f"M2RESTORE_FP32_DOT must be one of {FP32_DOT_PRECISIONS}, got {forced!r}")
        return forced
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"
