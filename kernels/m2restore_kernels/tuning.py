"""Launch configurations of the Triton kernels, as data: the supported hook for tuning them.

The ops launch their kernels with configurations chosen by rule, not autotuned (autotuning would
compile every candidate in the user's first call). For each op with Triton kernels this module
gives its ``triton_impl`` module, which exposes the same names:

* ``LaunchConfig``: a frozen dataclass of tile sizes and warps (``dataclasses.replace`` makes variants);
* ``default_config(...)``: the rule's choice for a problem shape and device;
* ``<op>_fwd(..., config=None)`` and ``<op>_bwd(..., config=None)``: the launchers, which run the
  kernels with ``config`` (the default one when None) on tensors already validated, contiguous and
  in the compute dtype, as the op's custom op passes them; they do no argument checking;
* ``KERNELS``: the ``triton.jit`` kernels by name, for ahead-of-time compilation checks
  (``bench/compile_check.py``); the MoE adds the block-size rules its other kernels launch with
  (``combine_block_p``, ``topk_block_p``, ``plan_block``, ``PLAN_SCAN_TILES``).

Example (``bench/tune.py`` times grids of these)::

    from dataclasses import replace
    from m2restore_kernels import tuning
    cfg = tuning.moe.default_config(K * P, N, C, Hd, x.device, torch.bfloat16)
    y = tuning.moe.moe_mlp_fwd(x, w, idx, w1, b1, w2, b2, "sum", torch.bfloat16, config=replace(cfg, block_m=64))[0]

``dot_precision(dtype)`` is the ``tl.dot`` input precision the kernels use for operands of ``dtype``.
"""
from ._triton import dot_precision
from .gated_fusion import triton_impl as gated_fusion
from .moe import triton_impl as moe
from .selective_scan import triton_impl as selective_scan

__all__ = ["moe", "selective_scan", "gated_fusion", "dot_precision"]
