"""PyTorch path of the causal conv: one grouped ``F.conv1d`` over the input behind its prefix
(initial states or zeros), already a single fused library call on CPU and CUDA; with ``seq_idx`` the
reference's masked sum over the width taps (a few elementwise passes). Autograd runs through both."""
from __future__ import annotations

import torch.nn.functional as F

from .reference import compute_dtype, conv_input, epilogue, masked_window_sum


def causal_conv1d_fwd(x, weight, bias, seq_idx, initial_states, activation):
    """-> (out (b, d, l) in x's dtype, the conv input (b, d, w - 1 + l) in the compute dtype)."""
    w = weight.shape[1]
    full = conv_input(x, initial_states, w, compute_dtype(x, weight, bias, initial_states))
    if seq_idx is None and x.shape[-1] > 0:
        # Under autocast F.conv1d computes in the autocast dtype (its own rule).
        raw = F.conv1d(full, weight.to(full.dtype).unsqueeze(1), groups=x.shape[1])
    else:
        raw = masked_window_sum(full, weight, seq_idx)
    return epilogue(raw, bias, seq_idx, activation, x.dtype), full
