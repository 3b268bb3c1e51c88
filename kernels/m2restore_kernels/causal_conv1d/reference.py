"""Plain PyTorch reference of the causal conv and its one-step update, their argument checks, and
the pieces the PyTorch path shares with it (the masked window sum, the epilogue, the final states).

Every function here computes in float32, or float64 when x, weight, bias or the states are float64,
and returns x's dtype (causal_conv1d's rule: float32 weights with 16-bit x are upcast, not the
reverse)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._slots import check_indices, read_rows, write_rows_

ACTIVATIONS = (None, "silu", "swish")


def compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if torch.float64 in [t.dtype for t in tensors if t is not None] else torch.float32


def _check_float(name: str, t, device: torch.device):
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")


def _check_weights(x: Tensor, weight, bias, activation):
    _check_float("x", x, x.device)
    _check_float("weight", weight, x.device)
    d = x.shape[1] if x.dim() >= 2 else None
    if weight.dim() != 2 or weight.shape[0] != d or weight.shape[1] < 1:
        raise ValueError(f"weight must be (dim={d}, width), got shape {tuple(weight.shape)}")
    if bias is not None:
        _check_float("bias", bias, x.device)
        if bias.shape != (d,):
            raise ValueError(f"bias must be (dim={d},), got shape {tuple(bias.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _check_args(x: Tensor, weight: Tensor, bias, activation, seq_idx=None, initial_states=None,
                return_final_states=False, final_states_out=None):
    """causal_conv1d_fn's argument rules, each a one-line ValueError naming the argument."""
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise ValueError(f"x must be (batch, dim, seqlen), got shape {tuple(getattr(x, 'shape', ()))}")
    _check_weights(x, weight, bias, activation)
    b, d, l = x.shape
    states_shape = (b, d, weight.shape[1] - 1)
    if seq_idx is not None:
        if not isinstance(seq_idx, Tensor) or seq_idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"seq_idx must be an int32 or int64 tensor, "
                             f"got {getattr(seq_idx, 'dtype', type(seq_idx))}")
        if seq_idx.shape != (b, l) or seq_idx.device != x.device:
            raise ValueError(f"seq_idx must be (batch={b}, seqlen={l}) on {x.device}, "
                             f"got {tuple(seq_idx.shape)} on {seq_idx.device}")
        if return_final_states:
            raise ValueError("seq_idx cannot be combined with return_final_states (nor can it in causal_conv1d)")
    for name, t in (("initial_states", initial_states), ("final_states_out", final_states_out)):
        if t is not None:
            _check_float(name, t, x.device)
            if t.shape != states_shape:
                raise ValueError(f"{name} must be (batch, dim, width - 1) = {states_shape}, got {tuple(t.shape)}")


def conv_input(x: Tensor, initial_states: Optional[Tensor], width: int, ct: torch.dtype) -> Tensor:
    """x (b, d, l) behind its width - 1 predecessors (initial_states, or zeros): (b, d, width - 1 + l) in ct."""
    prefix = (initial_states.to(ct) if initial_states is not None
              else x.new_zeros(x.shape[0], x.shape[1], width - 1, dtype=ct))
    return torch.cat([prefix, x.to(ct)], dim=-1)


def masked_window_sum(full: Tensor, weight: Tensor, seq_idx: Optional[Tensor]) -> Tensor:
    """sum_k weight[:, k] full[..., t + k] over the taps from t's own sequence (seq_idx equal; the
    width - 1 prefix belongs to each row's first sequence) -> (b, d, l), no bias."""
    w = weight.shape[1]  # >= 1
    l = full.shape[-1] - (w - 1)
    wt = weight.to(full.dtype)
    ids = None if seq_idx is None else torch.cat([seq_idx[:, :1].expand(-1, w - 1), seq_idx], dim=-1)
    out = 0
    for k in range(w):
        tap = wt[:, k, None] * full[..., k:k + l]
        if ids is not None:
            tap = tap * (ids[:, None, k:k + l] == seq_idx[:, None, :])
        out = out + tap
    return out


def epilogue(raw: Tensor, bias: Optional[Tensor], seq_idx: Optional[Tensor], activation, dtype: torch.dtype) -> Tensor:
    """+ bias, zeros where seq_idx < 0 (padding), activation, cast to x's dtype."""
    if bias is not None:
        raw = raw + bias.to(raw.dtype)[:, None]
    if seq_idx is not None:
        raw = raw.masked_fill((seq_idx < 0)[:, None, :], 0.0)
    return (F.silu(raw) if activation in ("silu", "swish") else raw).to(dtype)


def with_final_states(out: Tensor, full: Tensor, width: int, dtype: torch.dtype, return_final_states: bool,
                      final_states_out: Optional[Tensor]):
    """out, or (out, the last width - 1 columns of the conv input in x's dtype), written into
    final_states_out when given (the copy is differentiable, so gradients flow from it)."""
    if not return_final_states:
        return out
    final = full[..., full.shape[-1] - (width - 1):].to(dtype)
    if final_states_out is not None:
        final = final_states_out.copy_(final)
    return out, final


def causal_conv1d_ref(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                      final_states_out=None, activation=None):
    """Reference of :func:`causal_conv1d_fn` (same signature and results), the window sum written out.

    x (b, d, l); weight (d, w); bias (d,); seq_idx (b, l) int; initial_states and final_states_out
    (b, d, w - 1). out[:, c, t] = act(bias[c] + sum_k weight[c, k] * x[:, c, t - (w - 1) + k]) over
    the taps k whose position holds t's sequence (seq_idx), with initial_states (or zeros) before
    t = 0; zero where seq_idx < 0. NaN and infinities are not masked: one in x[:, c, t] reaches
    out[:, c, t:t + w].
    """
    _check_args(x, weight, bias, activation, seq_idx, initial_states, return_final_states, final_states_out)
    w = weight.shape[1]
    full = conv_input(x, initial_states, w, compute_dtype(x, weight, bias, initial_states))
    out = epilogue(masked_window_sum(full, weight, seq_idx), bias, seq_idx, activation, x.dtype)
    return with_final_states(out, full, w, x.dtype, return_final_states, final_states_out)


def check_update_args(x, conv_state, weight, bias, activation, cache_seqlens, conv_state_indices):
    if not isinstance(x, Tensor) or x.dim() not in (2, 3):
        raise ValueError(f"x must be (batch, dim) or (batch, dim, seqlen), got shape {tuple(getattr(x, 'shape', ()))}")
    _check_weights(x, weight, bias, activation)
    _check_float("conv_state", conv_state, x.device)
    b, d = x.shape[:2]
    w = weight.shape[1]
    rows = b if conv_state_indices is None else conv_state.shape[0]
    if conv_state.dim() != 3 or conv_state.shape[:2] != (rows, d) or conv_state.shape[2] < w - 1:
        raise ValueError(f"conv_state must be ({'batch=' if conv_state_indices is None else 'slots, '}{rows}, "
                         f"dim={d}, state_len >= width - 1 = {w - 1}), got {tuple(conv_state.shape)}")
    check_indices("cache_seqlens", cache_seqlens, b, x.device)
    check_indices("conv_state_indices", conv_state_indices, b, x.device)
    if cache_seqlens is not None and conv_state.shape[2] == 0:
        raise ValueError("cache_seqlens needs a conv_state with state_len >= 1")


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                             conv_state_indices=None):
    """Reference (and PyTorch path) of :func:`causal_conv1d_update`: the next seqlen steps of the
    causal conv from a cache of past inputs, conv_state updated in place.

    x (b, d) or (b, d, l); conv_state (b, d, S) with S >= w - 1, or (slots, d, S) read and written at
    rows conv_state_indices (b,) (a negative index: a padding row, output zero, no slot written);
    cache_seqlens (b,) int: conv_state is a ring buffer whose next write position is
    cache_seqlens % S (else its last S columns are the most recent inputs, shifted left by l).
    -> out shaped like x, in x's dtype.
    """
    check_update_args(x, conv_state, weight, bias, activation, cache_seqlens, conv_state_indices)
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(-1)
    b, d, l = x.shape
    w = weight.shape[1]
    S = conv_state.shape[2]
    state, valid = read_rows(conv_state, conv_state_indices)
    if cache_seqlens is None:
        history = state[..., S - (w - 1):]
        new_state = torch.cat([state, x.to(state.dtype)], dim=-1)[..., -S:] if S else state
    else:
        start = cache_seqlens.long()[:, None]
        past = torch.remainder(start + torch.arange(-(w - 1), 0, device=x.device), S)
        history = state.gather(2, past[:, None, :].expand(b, d, w - 1))
        ahead = torch.remainder(start + torch.arange(l, device=x.device), S)
        new_state = state.scatter(2, ahead[:, None, :].expand(b, d, l), x.to(state.dtype))
    ct = compute_dtype(x, weight, bias, conv_state)
    window = torch.cat([history.to(ct), x.to(ct)], dim=-1)
    out = epilogue(masked_window_sum(window, weight, None), bias, None, activation, x.dtype)
    if valid is not None:
        out = out.masked_fill(~valid[:, None, None], 0.0)
    write_rows_(conv_state, conv_state_indices, valid, state, new_state)
    return out.squeeze(-1) if squeeze else out


def check_varlen_states_args(x, cu_seqlens, state_len):
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"x must be (total_tokens, dim), got shape {tuple(getattr(x, 'shape', ()))}")
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or \
            cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.device != x.device:
        raise ValueError(f"cu_seqlens must be an int32 or int64 (batch + 1,) tensor on {x.device}, got "
                         f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens))} of shape {tuple(getattr(cu_seqlens, 'shape', ()))}")
    if isinstance(state_len, bool) or not isinstance(state_len, int) or state_len < 0:
        raise ValueError(f"state_len must be an int >= 0, got {state_len!r}")


def causal_conv1d_varlen_states_ref(x: Tensor, cu_seqlens: Tensor, state_len: int) -> Tensor:
    """Reference of :func:`~m2restore_kernels.causal_conv1d.causal_conv1d_varlen_states`, one
    sequence at a time: states[i] holds the last min(state_len, length_i) inputs of sequence i
    (tokens cu_seqlens[i] to cu_seqlens[i + 1] of x), right-aligned, zeros before them.
    x (total_tokens, dim); cu_seqlens (batch + 1,) sorted -> (batch, dim, state_len) in x's dtype."""
    check_varlen_states_args(x, cu_seqlens, state_len)
    batch, dim = cu_seqlens.shape[0] - 1, x.shape[1]
    states = x.new_zeros(batch, dim, state_len)
    for i in range(batch):
        start, end = int(cu_seqlens[i]), int(cu_seqlens[i + 1])
        take = min(state_len, end - start)
        if take > 0:
            states[i, :, state_len - take:] = x[end - take:end].t()
    return states
