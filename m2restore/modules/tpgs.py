"""TPGS: the task prompt, computed once per image from the input (paper eqs. 1-2)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class TaskPrompt(nn.Module):
    """images (B, 3, H, W) -> T (B, prompt_dim) = GELU(softmax(Linear(GAP(convs(I)))) @ τ).

    convs: conv3×3 stride 3 (3→hidden), LReLU, conv3×3 stride 3 (hidden→hidden), LReLU, 1×1, LReLU,
    1×1, LReLU, 1×1 (hidden→prompt_len); τ is the learnable prompt library (prompt_len, prompt_dim).
    """

    # Two unpadded stride-3 3×3 convs need at least 9 pixels per side.
    MIN_SIZE = 9

    def __init__(self, hidden: int = 64, prompt_len: int = 32, prompt_dim: int = 256, slope: float = 0.1):
        super().__init__()
        act = nn.LeakyReLU(slope)
        self.convs = nn.Sequential(
            nn.Conv2d(3, hidden, 3, stride=3), act,
            nn.Conv2d(hidden, hidden, 3, stride=3), act,
            nn.Conv2d(hidden, hidden, 1), act,
            nn.Conv2d(hidden, hidden, 1), act,
            nn.Conv2d(hidden, prompt_len, 1),
        )
        self.weights = nn.Linear(prompt_len, prompt_len)
        self.library = nn.Parameter(torch.randn(prompt_len, prompt_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        if h < self.MIN_SIZE or w < self.MIN_SIZE:
            images = F.pad(images, (0, max(0, self.MIN_SIZE - w), 0, max(0, self.MIN_SIZE - h)), mode="replicate")
        q = torch.softmax(self.weights(self.convs(images).mean(dim=(2, 3))), dim=-1)
        return F.gelu(q @ self.library)
