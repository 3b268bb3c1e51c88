"""The degradation-prior interface, and the prior that carries no signal."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class DegradationPrior(Protocol):
    """images (B, 3, H, W) in [0, 1] -> (d_g (B, D) probabilities over the degradation names,
    P_f (B, 512) image features). DA-CLIP is the paper's (``m2restore.prior.DAClipPrior``)."""

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class NullPrior:
    """Uniform d_g and zero P_f: the DDER bias is then the same for every image and the DGF prompt
    is a constant, so a model trained with DA-CLIP must not be run with this prior."""

    def __init__(self, num_degradations: int, dim: int = 512):
        if num_degradations < 1 or dim < 1:
            raise ValueError(f"num_degradations and dim must be positive, got {num_degradations}, {dim}")
        self.num_degradations = num_degradations
        self.dim = dim

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = images.shape[0]
        d_g = images.new_full((b, self.num_degradations), 1.0 / self.num_degradations)
        return d_g, images.new_zeros(b, self.dim)

    def __repr__(self) -> str:
        return f"NullPrior(num_degradations={self.num_degradations}, dim={self.dim})"
