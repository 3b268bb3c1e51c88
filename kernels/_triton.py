"""Triton, imported once for every op, and the device functions the ops share.

Triton is Linux-only: without it the package still imports and runs its PyTorch paths
(``resolve_backend`` never picks Triton then), so kernels are decorated with ``jit``, which is a
no-op when triton is missing.
"""
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
