"""m2restore_kernels: Triton kernels (with PyTorch references) for M2Restore.

Every op takes ``backend="auto"|"triton"|"torch"`` (``_backend.resolve_impl`` turns it into the
implementation that runs) and has a ``*_ref`` plain-PyTorch reference beside it. Each op is a
package of one layout: ``__init__`` (public API, custom ops), ``reference``, ``triton_impl``,
``torch_impl`` and, where a C loop exists, ``native_impl``. Launch configurations are data:
``m2restore_kernels.tuning``.
"""
from importlib import metadata as _metadata

from ._backend import BACKENDS, resolve_backend
from .causal_conv1d import (causal_conv1d, causal_conv1d_fn, causal_conv1d_ref, causal_conv1d_update,
                            causal_conv1d_update_ref, causal_conv1d_varlen_states, causal_conv1d_varlen_states_ref)
from .gated_fusion import gated_fusion, gated_fusion_ref
from .integrations.mamba_ssm import apply_to_mamba_ssm
from .moe import moe_mlp, moe_mlp_ref, topk_softmax, topk_softmax_ref
from .selective_scan import (mamba_inner_fn, mamba_inner_ref, selective_scan, selective_scan_ref,
                             selective_state_update, selective_state_update_ref)
from .selective_scan.ssd import mamba_chunk_scan_combined, mamba_split_conv1d_scan_combined

def _installed_version() -> str:
    # Two distributions ship this package: the kernels alone (kernels/pyproject.toml) and m2restore.
    for distribution in ("m2restore-kernels", "m2restore"):
        try:
            return _metadata.version(distribution)
        except _metadata.PackageNotFoundError:
            continue
    return "0+unknown"  # run from a source tree (PYTHONPATH), not installed


__version__ = _installed_version()

__all__ = [
    "BACKENDS", "resolve_backend", "__version__",
    "apply_to_mamba_ssm",
    "topk_softmax", "topk_softmax_ref", "moe_mlp", "moe_mlp_ref",
    "gated_fusion", "gated_fusion_ref",
    "selective_scan", "selective_scan_ref", "selective_state_update", "selective_state_update_ref",
    "mamba_inner_fn", "mamba_inner_ref", "mamba_chunk_scan_combined", "mamba_split_conv1d_scan_combined",
    "causal_conv1d", "causal_conv1d_ref", "causal_conv1d_fn", "causal_conv1d_update", "causal_conv1d_update_ref",
    "causal_conv1d_varlen_states", "causal_conv1d_varlen_states_ref",
]
