"""PyTorch path of the gated fusion: the same math in the fewest framework ops (one 1x1 conv for the
C x C gate product, cuDNN/oneDNN depthwise conv); autograd and torch.compile native."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gated_fusion_fwd(y, mamba, prompt_bias, dw_weight, dw_bias, g1_weight, g1_bias, g2_weight, g2_bias, residual):
    """Arguments as ``gated_fusion``'s, all in the compute dtype -> out (B, C, H, W) in y's layout."""
    hidden_bias = prompt_bias if g1_bias is None else prompt_bias + g1_bias
    h = F.conv2d(y, g1_weight[:, :, None, None]) + hidden_bias[:, :, None, None]
    gate_logit = F.conv2d(F.gelu(h), g2_weight[:, :, None, None], g2_bias)
    cnn = F.gelu(F.conv2d(y, dw_weight, dw_bias, padding=1, groups=y.shape[1]))
    # G cnn + (1 - G) mamba in one pass, as cnn + sigmoid(-s) (mamba - cnn): cnn leads, so out keeps y's layout.
    out = torch.lerp(cnn, mamba, torch.sigmoid(-gate_logit))
    return out if residual is None else out + residual

