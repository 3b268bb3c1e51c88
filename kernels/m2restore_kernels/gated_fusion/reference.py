"""Plain PyTorch reference of the gated fusion."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gated_fusion_ref(y, mamba, prompt_bias, dw_weight, dw_bias, g1_weight, g1_bias, g2_weight, g2_bias, residual=None):
    """G = sigmoid(g2 . GELU(g1 . y + g1_bias + prompt_bias) + g2_bias);
    out = G * GELU(dwconv3x3(y) + dw_bias) + (1 - G) * mamba (+ residual)."""
    C = y.shape[1]
    h = torch.einsum("oc,bchw->bohw", g1_weight, y) + prompt_bias[:, :, None, None]
    if g1_bias is not None:
        h = h + g1_bias[None, :, None, None]
    g = torch.einsum("oc,bchw->bohw", g2_weight, F.gelu(h))
    if g2_bias is not None:
        g = g + g2_bias[None, :, None, None]
    g = torch.sigmoid(g)
    cnn = F.gelu(F.conv2d(y, dw_weight, dw_bias, padding=1, groups=C))
    out = g * cnn + (1 - g) * mamba
    return out if residual is None else out + residual
