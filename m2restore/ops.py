"""The one place where the model's backend string becomes a kernel call.

Model backends: ``"auto" | "triton" | "torch"`` go straight to the ops of ``m2restore_kernels``
(whose resolver, ``m2restore_kernels._backend``, picks the implementation); ``"reference"`` runs their plain ``*_ref`` versions
(sequential scan, expert loop), and the modules that have a literal form (DGF's concatenation and
1×1 convolutions) use it. Nothing else in the model looks at devices.
"""
from __future__ import annotations

import functools

import m2restore_kernels as K

from .config import MODEL_BACKENDS


def check_backend(backend: str) -> str:
    if backend not in MODEL_BACKENDS:
        raise ValueError(f"backend must be one of {MODEL_BACKENDS}, got {backend!r}")
    return backend


def _op(name: str, backend: str, **kernel_options):
    """The op ``name`` for ``backend``; ``kernel_options`` go to the kernel op only (the plain
    ``*_ref`` functions take none)."""
    if backend == "reference":
        return getattr(K, f"{name}_ref")
    return functools.partial(getattr(K, name), backend=backend, **kernel_options)


def topk_softmax(logits, k: int, backend: str, return_next: bool = False):
    """logits (P, N) -> (weights (P, K), indices (P, K) int64), and with ``return_next`` the (K+1)-th
    largest logit (P,) (-inf where K = N) that a noisy top-K load needs; see
    ``m2restore_kernels.topk_softmax``."""
    return _op("topk_softmax", backend)(logits, k, return_next=return_next)


def moe_mlp(x, weights, indices, w1, b1, w2, b2, combine: str, backend: str):
    """x (P, C) through the K chosen experts per row; see ``m2restore_kernels.moe_mlp``.
    ``indices`` come from :func:`topk_softmax`, so the kernels skip their range check (a host
    sync on CUDA)."""
    return _op("moe_mlp", backend, check_indices=False)(x, weights, indices, w1, b1, w2, b2, combine=combine)


def gated_fusion(y, mamba, prompt_bias, dw_weight, dw_bias, g1_weight, g1_bias, g2_weight, g2_bias,
                 residual, backend: str):
    """DGF's depthwise conv, per-pixel gate and blend; see ``m2restore_kernels.gated_fusion``."""
    return _op("gated_fusion", backend)(y, mamba, prompt_bias, dw_weight, dw_bias, g1_weight, g1_bias,
                                        g2_weight, g2_bias, residual=residual)


def causal_conv1d(x, weight, bias, activation, backend: str):
    """x (b, d, l), weight (d, w) -> (b, d, l); see ``m2restore_kernels.causal_conv1d``."""
    return _op("causal_conv1d", backend)(x, weight, bias, activation=activation)


def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, backend: str):
    """mamba_ssm's ``selective_scan_fn`` semantics; see ``m2restore_kernels.selective_scan``."""
    return _op("selective_scan", backend)(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
