"""Depthwise causal 1-D convolution (the conv of Mamba's mixer) with causal_conv1d's API:
``causal_conv1d_fn`` (whole signature: ``seq_idx``, ``initial_states``, ``return_final_states``,
``final_states_out``) and the decode step ``causal_conv1d_update``, each with its ``*_ref``.
``causal_conv1d(x, weight, bias, activation, backend=)`` is the short form the model calls.

Implementations, chosen by ``_backend.resolve_impl``: ``"extension"`` (``backend="auto"`` on CUDA
uses the ``causal_conv1d`` package's kernel for the forms it takes: plain calls, 16/32-bit, width
2..4; imported lazily, never on CPU), else ``"torch"`` (``torch_impl.py``: a grouped ``F.conv1d``,
or the masked window sum with ``seq_idx``; autograd through it). There is no Triton version: the
conv is already a single fused library call, so ``backend="triton"`` runs it too. The update is
a C loop on CPU (``native_impl.py``, ``csrc/causal_conv1d_cpu.c``: one pass per step, the cache
updated in place) and PyTorch elsewhere (``reference.causal_conv1d_update_ref``: a gather, one small
conv, an in-place write of the cache).

All of it is traceable: torch.compile(fullgraph=True) keeps every form.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._backend import OPS, UP_TO_FLOAT32, grad_needed, optional_op, resolve_impl
from . import native_impl, torch_impl
from .reference import (ACTIVATIONS, _check_args, causal_conv1d_ref, causal_conv1d_update_ref,
                        causal_conv1d_varlen_states_ref, check_update_args, check_varlen_states_args, compute_dtype,
                        with_final_states)

__all__ = ["causal_conv1d", "causal_conv1d_fn", "causal_conv1d_ref", "causal_conv1d_update",
           "causal_conv1d_update_ref", "causal_conv1d_varlen_states", "causal_conv1d_varlen_states_ref",
           "ACTIVATIONS"]

CAUSAL_CONV1D_FN = OPS["causal_conv1d"].extension


def _extension_takes(x, weight, bias) -> bool:
    """The forms causal_conv1d's CUDA kernel accepts (it raises on the others)."""
    return (2 <= weight.shape[1] <= 4 and weight.dtype in UP_TO_FLOAT32
            and (bias is None or bias.dtype == weight.dtype) and (x.stride(2) == 1 or x.stride(1) == 1))


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None, backend: str = "auto"):
    """causal_conv1d's ``causal_conv1d_fn``: depthwise causal conv, results as :func:`causal_conv1d_ref`.

    x (b, d, l), any strides (channel-last too; unlike the package, seq_idx and the states do not
    require it); weight (d, w), any w >= 1; bias (d,) or None; seq_idx (b, l) int32/int64: taps reach
    only positions of the same sequence, outputs at seq_idx < 0 are zero; initial_states (b, d, w - 1):
    the inputs before t = 0 (they belong to each row's first sequence); return_final_states: also
    return the last w - 1 inputs (b, d, w - 1) in x's dtype (not with seq_idx), written into
    final_states_out when given (ignored otherwise, as in the package); activation None, "silu" or
    "swish". seqlen 0 gives an empty output.

    Dtypes: any floating x, weight, bias, states, each its own; computed in float32 (float64 when
    any is float64; under autocast the plain conv runs in the autocast dtype); out in x's dtype.
    Gradients reach x, weight, bias and initial_states, also from the final states.
    Raises a one-line ValueError naming the argument for bad shapes, dtypes or combinations.
    """
    _check_args(x, weight, bias, activation, seq_idx, initial_states, return_final_states, final_states_out)
    plain = seq_idx is None and initial_states is None and not return_final_states
    if (resolve_impl("causal_conv1d", x.device, x.dtype, backend) == "extension" and plain
            and _extension_takes(x, weight, bias)):
        # By keyword: causal_conv1d_fn's fourth parameter is seq_idx.
        return optional_op(*CAUSAL_CONV1D_FN)(x, weight, bias, activation=activation)
    out, full = torch_impl.causal_conv1d_fwd(x, weight, bias, seq_idx, initial_states, activation)
    return with_final_states(out, full, weight.shape[1], x.dtype, return_final_states, final_states_out)


def causal_conv1d(x, weight, bias=None, activation=None, backend: str = "auto"):
    """``causal_conv1d_fn(x, weight, bias, activation=activation, backend=backend)``: the form the
    model calls, with the activation as fourth positional argument."""
    return causal_conv1d_fn(x, weight, bias, activation=activation, backend=backend)


def _native_update(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str],
                   cache_seqlens: Optional[Tensor], conv_state_indices: Optional[Tensor]) -> Tensor:
    """The C decode step (x (b, d) or (b, d, l)), conv_state written in place -> out shaped like x, in x's dtype."""
    out = native_impl.causal_conv1d_update(x, conv_state, weight, bias, activation, cache_seqlens, conv_state_indices)
    return out if out.dtype == x.dtype else out.to(x.dtype)


# The same as a custom op, which torch.compile keeps whole (it cannot trace a ctypes call). Eager
# calls skip it: the custom-op dispatch costs more than a small model's whole decode step.
_update_op = torch.library.custom_op("m2restore_kernels::causal_conv1d_update",
                                     mutates_args=("conv_state",))(_native_update)


@_update_op.register_fake
def _(x, conv_state, weight, bias, activation, cache_seqlens, conv_state_indices):
    return torch.empty_like(x)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                         conv_state_indices=None, backend: str = "auto"):
    """causal_conv1d's ``causal_conv1d_update``: one (x (b, d)) or a few (x (b, d, l)) decode steps of
    the causal conv from conv_state, which is updated in place; semantics of
    :func:`~.reference.causal_conv1d_update_ref` (ring buffer with cache_seqlens, slots with
    conv_state_indices, negative slot = padding row: zero output, nothing written).
    -> out shaped like x, in x's dtype.

    On CPU a C loop (``native_impl``) runs calls with a float32 conv_state that need no gradient;
    the rest, and every other device, run the PyTorch ops (differentiable in x, weight and bias)."""
    check_update_args(x, conv_state, weight, bias, activation, cache_seqlens, conv_state_indices)
    impl = resolve_impl("causal_conv1d_update", x.device, compute_dtype(x, weight, bias, conv_state), backend)
    # The C loop keeps the cache in float32, so it takes only a float32 conv_state.
    if impl == "native" and conv_state.dtype == torch.float32 and not grad_needed(x, weight, bias):
        step = _update_op if torch.compiler.is_compiling() else _native_update
        return step(x, conv_state, weight, bias, activation, cache_seqlens, conv_state_indices)
    return causal_conv1d_update_ref(x, conv_state, weight, bias, activation, cache_seqlens, conv_state_indices)


def causal_conv1d_varlen_states(x: Tensor, cu_seqlens: Tensor, state_len: int) -> Tensor:
    """causal_conv1d's ``causal_conv1d_varlen_states`` (a Triton kernel there; Mamba-2's varlen
    prefill): the conv cache of each packed sequence, results as
    :func:`~.reference.causal_conv1d_varlen_states_ref`. x (total_tokens, dim); cu_seqlens
    (batch + 1,) int, sorted -> (batch, dim, state_len) in x's dtype, laid out as upstream's
    ((batch, state_len, dim) memory, transposed). One gather and a mask, no loop over sequences,
    no host sync; no backward (as upstream)."""
    check_varlen_states_args(x, cu_seqlens, state_len)
    batch, dim = cu_seqlens.shape[0] - 1, x.shape[1]
    bounds = cu_seqlens.long()
    # Token position of every state column: the last state_len positions before each sequence's end.
    pos = bounds[1:, None] - state_len + torch.arange(state_len, device=x.device)
    valid = pos >= bounds[:-1, None]
    rows = x.index_select(0, pos.clamp(0, x.shape[0] - 1).flatten()) if x.shape[0] else \
        x.new_zeros(batch * state_len, dim)
    states = rows.view(batch, state_len, dim).masked_fill(~valid[..., None], 0)
    return states.transpose(1, 2)
