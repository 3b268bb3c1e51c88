"""m2restore_kernels: Triton kernels (with PyTorch references) for M2Restore.

Every op takes ``backend="auto"|"triton"|"torch"`` (see ``_backend.resolve_backend``) and has a
``*_ref`` plain-PyTorch reference beside it.
"""
from ._backend import BACKENDS, resolve_backend
from .causal_conv1d import causal_conv1d, causal_conv1d_ref
from .gated_fusion import gated_fusion, gated_fusion_ref
from .moe import moe_mlp, moe_mlp_ref, topk_softmax, topk_softmax_ref
from .selective_scan import selective_scan, selective_scan_ref

__all__ = [
    "BACKENDS", "resolve_backend",
    "topk_softmax", "topk_softmax_ref", "moe_mlp", "moe_mlp_ref",
    "gated_fusion", "gated_fusion_ref",
    "selective_scan", "selective_scan_ref",
    "causal_conv1d", "causal_conv1d_ref",
]
