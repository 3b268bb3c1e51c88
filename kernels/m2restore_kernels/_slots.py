"""Decode caches addressed by slot: the rows of a state tensor that a batch reads and writes
(causal_conv1d's ``conv_state_indices``, mamba_ssm's ``state_batch_indices``), with negative
indices marking padding rows, whose outputs are zero and which write nothing. Shared by the conv and the scan's
one-step updates; data-independent ops only, so torch.compile(fullgraph=True) keeps them."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def check_indices(name: str, indices: Optional[Tensor], batch: int, device: torch.device):
    if indices is None:
        return
    if not isinstance(indices, Tensor) or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be an int32 or int64 tensor, got {getattr(indices, 'dtype', type(indices))}")
    if indices.shape != (batch,):
        raise ValueError(f"{name} must be (batch={batch},), got shape {tuple(indices.shape)}")
    if indices.device != device:
        raise ValueError(f"{name} is on {indices.device} but x is on {device}")


def read_rows(state: Tensor, indices: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """The rows ``state[indices]`` (a copy; padding rows read row 0) and the mask of real rows
    (None without indices: then the rows are ``state`` itself)."""
    if indices is None:
        return state, None
    valid = indices >= 0
    return state.index_select(0, indices.long().clamp_min(0)), valid


def write_rows_(state: Tensor, indices: Optional[Tensor], valid: Optional[Tensor], old: Tensor, new: Tensor):
    """``state[indices[i]] = new[i]`` in place for the real rows; padding rows leave ``state`` as it was.

    Without a data-dependent selection (which would break torch.compile): every padding row writes
    what some real row writes to the same slot, the first real row's (or, with none, row 0's own
    old value back to slot 0), so colliding copies carry identical values.
    """
    new = new.to(state.dtype)
    if indices is None:
        state.copy_(new)
        return
    slots = indices.long().clamp_min(0)
    first = valid.to(torch.int8).argmax().view(1)  # 0 when no row is real; a tensor index, not .item()
    mask = valid.view(-1, *([1] * (new.dim() - 1)))
    fill = torch.where(mask.index_select(0, first), new.index_select(0, first), old.index_select(0, first))
    state.index_copy_(0, torch.where(valid, slots, slots.index_select(0, first)), torch.where(mask, new, fill))
