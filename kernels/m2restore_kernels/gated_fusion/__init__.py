"""Fused depthwise 3x3 conv + per-pixel gate + blend (the DGF of M2Restore's MCDB).

For every pixel p of y (B, C, H, W), with W1 = g1_weight (C, C) and w2 = g2_weight (1, C):

    h    = W1 y_p + g1_bias + prompt_bias[b]          (C,)
    G    = sigmoid(w2 . GELU(h) + g2_bias)            scalar, one per pixel
    cnn  = GELU(dwconv3x3(y)_p + dw_bias)              (C,), zero padding at the image border
    out  = G * cnn + (1 - G) * mamba_p (+ residual_p)

GELU is the exact (erf) one. Implementations, chosen by ``_backend.resolve_impl``:
``reference.py`` (``gated_fusion_ref``, the plain float reference), ``torch_impl.py`` (PyTorch
ops, autograd by PyTorch) and ``triton_impl.py`` (fused kernels), the latter registered as the
custom op ``m2restore_kernels::gated_fusion`` with its backward ``m2restore_kernels::gated_fusion_bwd``.

Layouts: every feature map is addressed through its own strides, so NCHW-contiguous and
channels-last inputs both run without a copy. In the model, MCDB passes all three channels-last
(the Restormer blocks before it run channels-last, and mamba is the permuted pixel sequence); they
are read in place. ``out`` and dy take y's memory format, dmamba mamba's.

Dtypes: float32, float16, bfloat16, and float64 on the PyTorch path (the Triton kernels compute in
float32: ``backend="triton"`` raises a ValueError for float64, ``"auto"`` picks ``"torch"``). The compute dtype is y's, or the autocast dtype when autocast
is on for y's device; the parameters are cast to it (they are small), the Triton kernels read
y, mamba and residual in whatever dtype they have and convert in registers (no cast pass over the
maps; the PyTorch path casts them). ``out`` is in the compute dtype; every gradient in its input's
dtype. Accumulation is float32 everywhere. float32 gate products run as ``_triton.dot_precision``
says: float32-accurate 3xTF32 by default, TF32 once torch's float32 matmul precision allows it.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._backend import resolve_impl
from . import torch_impl, triton_impl
from .reference import gated_fusion_ref

__all__ = ["gated_fusion", "gated_fusion_ref"]


@torch.library.custom_op("m2restore_kernels::gated_fusion", mutates_args=())
def _gated_fusion_op(y: torch.Tensor, mamba: torch.Tensor, prompt_bias: torch.Tensor, dw_weight: torch.Tensor,
                     dw_bias: Optional[torch.Tensor], g1_weight: torch.Tensor, g1_bias: Optional[torch.Tensor],
                     g2_weight: torch.Tensor, g2_bias: Optional[torch.Tensor],
                     residual: Optional[torch.Tensor], impl: str) -> torch.Tensor:
    """The fused forward (``impl`` "triton", the one fused implementation). The parameters are contiguous
    and in the compute dtype, which ``out`` takes; y, mamba and residual are read in their own dtypes
    and strides (the public wrapper ensures this)."""
    return triton_impl.gated_fusion_fwd(y, mamba, prompt_bias, dw_weight, dw_bias, g1_weight, g1_bias, g2_weight,
                                        g2_bias, residual)


@_gated_fusion_op.register_fake
def _(y, mamba, prompt_bias, dw_weight, dw_bias, g1_weight, g1_bias, g2_weight, g2_bias, residual, impl):
    return torch.empty_like(y, dtype=g1_weight.dtype)


@torch.library.custom_op("m2restore_kernels::gated_fusion_bwd", mutates_args=())
def _gated_fusion_bwd_op(
    grad_out: torch.Tensor, y: torch.Tensor, mamba: torch.Tensor, prompt_bias: torch.Tensor, dw_weight: torch.Tensor,
    dw_bias: Optional[torch.Tensor], g1_weight: torch.Tensor, g1_bias: Optional[torch.Tensor],
    g2_weight: torch.Tensor, g2_bias: Optional[torch.Tensor], impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """Gradients (y, mamba, prompt_bias, dw_weight, dw_bias, g1_weight, g1_bias, g2_weight, g2_bias), each in
    its input's dtype; bias gradients are returned even for absent biases (the autograd formula drops them)."""
    return triton_impl.gated_fusion_bwd(grad_out, y, mamba, prompt_bias, dw_weight, dw_bias, g1_weight, g1_bias,
                                        g2_weight, g2_bias)


@_gated_fusion_bwd_op.register_fake
def _(grad_out, y, mamba, prompt_bias, dw_weight, dw_bias, g1_weight, g1_bias, g2_weight, g2_bias, impl):
    vec = g1_weight.new_empty(y.shape[1])
    return (torch.empty_like(y), torch.empty_like(mamba), torch.empty_like(prompt_bias), torch.empty_like(dw_weight),
            vec, torch.empty_like(g1_weight), vec.clone(), torch.empty_like(g2_weight), g1_weight.new_empty(1))


def _gated_fusion_setup_context(ctx, inputs, output):
    *saved, residual, impl = inputs
    ctx.save_for_backward(*saved)
    ctx.impl = impl
    ctx.has_bias = tuple(t is not None for t in (saved[4], saved[6], saved[8]))
    ctx.residual_dtype = None if residual is None else residual.dtype


def _gated_fusion_backward(ctx, grad_out):
    dy, dm, dpb, ddw, ddwb, dg1w, dg1b, dg2w, dg2b = _gated_fusion_bwd_op(grad_out, *ctx.saved_tensors, ctx.impl)
    has_dwb, has_b1, has_b2 = ctx.has_bias
    return (dy, dm, dpb, ddw, ddwb if has_dwb else None, dg1w, dg1b if has_b1 else None, dg2w,
            dg2b if has_b2 else None, None if ctx.residual_dtype is None else grad_out.to(ctx.residual_dtype), None)


_gated_fusion_op.register_autograd(_gated_fusion_backward, setup_context=_gated_fusion_setup_context)


def _check_args(y, mamba, prompt_bias, dw_weight, dw_bias, g1_weight, g1_bias, g2_weight, g2_bias, residual):
    if not isinstance(y, torch.Tensor) or y.dim() != 4 or not y.is_floating_point():
        raise ValueError(f"y must be a floating-point (B, C, H, W) tensor, got "
                         f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    B, C = y.shape[:2]
    expected = {
        "mamba": (mamba, tuple(y.shape), False), "residual": (residual, tuple(y.shape), True),
        "prompt_bias": (prompt_bias, (B, C), False), "dw_weight": (dw_weight, (C, 1, 3, 3), False),
        "dw_bias": (dw_bias, (C,), True), "g1_weight": (g1_weight, (C, C), False), "g1_bias": (g1_bias, (C,), True),
        "g2_weight": (g2_weight, (1, C), False), "g2_bias": (g2_bias, (1,), True),
    }
    for name, (t, shape, optional) in expected.items():
        if t is None:
            if optional:
                continue
            raise ValueError(f"{name} is required (shape {shape})")
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for y of shape {tuple(y.shape)}, got {tuple(t.shape)}")
        if t.device != y.device:
            raise ValueError(f"{name} is on {t.device} but y is on {y.device}")


def gated_fusion(y, mamba, prompt_bias, dw_weight, dw_bias, g1_weight, g1_bias, g2_weight, g2_bias,
                 residual=None, backend: str = "auto"):
    """The MCDB gated fusion (see the module docstring for the formula).

    Args:
        y, mamba: (B, C, H, W) float32/float16/bfloat16/float64 (float64 on the PyTorch path only),
            any strides (NCHW-contiguous and channels-last run without copies); y is the LayerNormed
            feature, mamba the Mamba branch output.
        prompt_bias: (B, C) the prompt half of the first gate conv, already applied to p.
        dw_weight: (C, 1, 3, 3) depthwise kernel; dw_bias: (C,) or None.
        g1_weight: (C, C) the feature half of the first gate conv; g1_bias: (C,) or None.
        g2_weight: (1, C) the second gate conv; g2_bias: (1,) or None.
        residual: (B, C, H, W) or None, added to the output.
        backend: "auto" | "triton" | "torch" (see ``_backend.resolve_impl``).

    Returns:
        out (B, C, H, W) in the compute dtype (y's, or the autocast dtype), in y's memory format.

    Parameters take any floating dtype and are cast to the compute dtype. NaN and infinities are
    not masked: one in y at a pixel reaches out there and at its eight neighbours (the 3x3 conv),
    one in mamba or residual only its own pixel, one in a parameter every pixel it multiplies.
    Raises a one-line ValueError for a wrong shape, device or backend, or float64 with
    ``backend="triton"``.
    """
    _check_args(y, mamba, prompt_bias, dw_weight, dw_bias, g1_weight, g1_bias, g2_weight, g2_bias, residual)
    device_type = y.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else y.dtype
    params = [t if t is None else t.to(dtype).contiguous()
              for t in (prompt_bias, dw_weight, dw_bias, g1_weight, g1_bias, g2_weight, g2_bias)]
    impl = resolve_impl("gated_fusion", y.device, dtype, backend)
    if impl == "torch":
        y, mamba, residual = (t if t is None else t.to(dtype) for t in (y, mamba, residual))
        return torch_impl.gated_fusion_fwd(y, mamba, *params, residual)
    # The kernel converts y, mamba and residual as it loads them: no cast pass over the feature maps.
    return _gated_fusion_op(y, mamba, *params, residual, impl)
