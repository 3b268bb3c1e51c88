"""Training loss of M2Restore (paper eq. 19): L1 + λ · Σ_DDER balance, λ = 0.01."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import M2RestoreConfig

# λ of the paper's loss, the one number shared with the config.
BALANCE_WEIGHT = M2RestoreConfig.balance_weight


def m2restore_loss(restored: torch.Tensor, target: torch.Tensor, balance_loss: torch.Tensor,
                   balance_weight: float = BALANCE_WEIGHT) -> torch.Tensor:
    """mean |restored − target| + balance_weight · balance_loss.

    restored, target (B, 3, H, W); balance_loss the scalar ``aux.balance_loss`` of
    ``model(x, return_aux=True)`` (already summed over the DDERs).
    """
    return F.l1_loss(restored, target) + balance_weight * balance_loss


class M2RestoreLoss(nn.Module):
    """``m2restore_loss`` as a module; ``balance_weight`` defaults to the config's λ (0.01)."""

    def __init__(self, balance_weight: float = BALANCE_WEIGHT):
        super().__init__()
        self.balance_weight = balance_weight

    def forward(self, restored: torch.Tensor, target: torch.Tensor, balance_loss: torch.Tensor) -> torch.Tensor:
        return m2restore_loss(restored, target, balance_loss, self.balance_weight)
