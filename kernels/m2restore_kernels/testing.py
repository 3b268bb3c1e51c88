"""The accuracy contract of every op, as one table that the tests and the benchmarks both check.

A result passes when its relative error in the 2-norm, ``‖actual − expected‖ / ‖expected‖``, is
within ``TOLERANCES[(op, dtype)]``, where ``expected`` is the op's ``*_ref`` reference evaluated in
float64 on the same (already rounded) inputs and ``dtype`` is the dtype the op computed in.

    from m2restore_kernels.testing import TOLERANCES, assert_close_rel
    assert_close_rel(moe_mlp(x, ...), moe_mlp_ref(x.double(), ...), "moe_mlp", x.dtype)

Kernel ops: float32 within 1e-5 (reachable because every op accumulates in float32 and the parity
runs use IEEE float32 dots, ``M2RESTORE_FP32_DOT=ieee``); float16 and bfloat16 within 1e-2, a few
units of bfloat16's rounding step (2^-8) after the float32 accumulation.

Whole networks (``"model"``: M2Restore end to end against its plain-PyTorch ``"reference"``
backend in float32; ``"daclip_prior"``: the DA-CLIP pass against a float64 copy) stack dozens of
layers, and rounding differences compound through them (under autocast, through LayerNorms and
softmaxes computed from rounded inputs too), so their autocast bounds are looser; each entry
names what it was measured at.
``"matmul"`` is the benchmarks' device yardstick, one GEMM against float64.
"""
from __future__ import annotations

from typing import Union

import torch

KERNEL_OPS = ("topk_softmax", "moe_mlp", "gated_fusion", "selective_scan", "causal_conv1d")
# float64 runs the PyTorch paths in float64: the reference's own precision, up to summation order.
_KERNEL_TOLERANCES = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}

TOLERANCES: dict[tuple[str, torch.dtype], float] = {
    **{(op, dtype): tol for op in KERNEL_OPS + ("matmul",) for dtype, tol in _KERNEL_TOLERANCES.items()},
    # paper() at 224², measured on CPU (bench/RESULTS.md): 2.5e-7 in float32 (kernels and reference
    # sum in different orders), 4.3e-3 under bf16 autocast (every GEMM and conv input rounded to
    # 8 mantissa bits, layer after layer); the bounds leave a factor of 5 and more.
    ("model", torch.float32): 1e-5,
    ("model", torch.bfloat16): 2e-2,
    ("model", torch.float16): 2e-2,  # unmeasured: bf16's bound (fp16 rounds 8× finer)
    # Random-weight ViT-B/32 DA-CLIP against its float64 copy, 224² and 1024² inputs, on CPU: at
    # most 6.7e-7 (d_g's scale of 100 amplifies the cosine's rounding).
    ("daclip_prior", torch.float32): 1e-5,
    ("daclip_prior", torch.float16): 1e-2,  # the towers' own float16 autocast on CUDA
}

# The short names the benchmarks and the ``m2restore bench`` command use for dtypes.
DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _dtype(dtype: Union[torch.dtype, str]) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be a torch.dtype or one of {tuple(DTYPE_NAMES)}, got {dtype!r}")
        return DTYPE_NAMES[dtype]
    return dtype


def tolerance(op: str, dtype: Union[torch.dtype, str]) -> float:
    """``TOLERANCES[(op, dtype)]``; ``dtype`` may be a torch dtype or "fp32" | "fp16" | "bf16"."""
    key = (op, _dtype(dtype))
    if key not in TOLERANCES:
        raise KeyError(f"no tolerance for op {op!r} in {key[1]}; known: {sorted({o for o, _ in TOLERANCES})}")
    return TOLERANCES[key]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 (the denominator floored at 1e-30: an all-zero
    reference then demands an all-zero result)."""
    actual, expected = actual.detach().double(), expected.detach().double().to(actual.device)
    return float(torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected).clamp_min(1e-30))


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, op: str, dtype: Union[torch.dtype, str],
                     what: str = "") -> float:
    """Raise ``AssertionError`` unless ``relative_error(actual, expected) <= tolerance(op, dtype)``
    (shapes must match and ``actual`` must be finite); returns the error. ``what`` names the
    tensor in the message (e.g. "grad of w1")."""
    label = f"{op} {_dtype(dtype)}" + (f" {what}" if what else "")
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(f"{label}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    if not bool(torch.isfinite(actual).all()):
        raise AssertionError(f"{label}: result has non-finite values")
    err, tol = relative_error(actual, expected), tolerance(op, dtype)
    if not err <= tol:
        raise AssertionError(f"{label}: relative error {err:.2e} > tolerance {tol:.0e}")
    return err
