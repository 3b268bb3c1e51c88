"""Plain PyTorch references of the MoE ops: obviously right, no speed ambitions."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

COMBINES = ("sum", "logsumexp")
# Plain activations: h = act(x @ w1 + b1). Gated ones: w1's hidden columns hold [gate | up] and
# h = act(gate) * up (SwiGLU: SiLU, GeGLU: exact GELU).
PLAIN_ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}
GATED_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu"}
ACTIVATIONS = tuple(PLAIN_ACTIVATIONS) + tuple(GATED_ACTIVATIONS)
LAYOUTS = ("stacked", "linear")
ROUTINGS = ("topk_softmax", "softmax_topk")


def topk_softmax_ref(logits: Tensor, k: int, return_next: bool = False):
    """logits (P, N) -> (weights (P, K) softmax of the K largest, sorted descending; indices (P, K) int64),
    with ``return_next=True`` also the (K+1)-th largest logit (P,) (-inf where K = N).

    The order is ``torch.sort``'s: NaN ranks above +inf, -0.0 equals 0.0, and equal logits (NaNs
    among them) go to the lower expert index (a stable descending sort). The softmax runs in the
    logits' dtype."""
    vals, idx = torch.sort(logits, dim=-1, descending=True, stable=True)
    routed = torch.softmax(vals[:, :k], dim=-1), idx[:, :k]
    if not return_next:
        return routed
    nxt = vals[:, k] if k < logits.shape[1] else logits.new_full(logits.shape[:1], float("-inf"))
    return (*routed, nxt)


def hidden(h: Tensor, activation: str) -> Tensor:
    """The expert's hidden activation from its first projection ``h`` (rows, Hd or 2*Hd)."""
    if activation in GATED_ACTIVATIONS:
        gate, up = h.chunk(2, dim=-1)
        return PLAIN_ACTIVATIONS[GATED_ACTIVATIONS[activation]](gate) * up
    return PLAIN_ACTIVATIONS[activation](h)


def moe_mlp_ref(x, weights, indices, w1, b1, w2, b2, combine: str = "sum", activation: str = "gelu",
                layout: str = "stacked"):
    """y[p] = sum_k weights[p,k] * (act(x[p] @ w1[e] + b1[e]) @ w2[e] + b2[e]), e = indices[p,k];
    combine="logsumexp": y[p] = log sum_k weights[p,k] * exp(expert output). ``layout="linear"``:
    w1 (N, H1, C) and w2 (N, C, Hd) as nn.Linear keeps them (x @ w1[e].T)."""
    if layout == "linear":
        w1, w2 = w1.transpose(1, 2), w2.transpose(1, 2)
    P, C = x.shape
    K = indices.shape[1]
    outs = x.new_zeros(P, K, w2.shape[2])
    for e in range(w1.shape[0]):
        for k in range(K):
            rows = (indices[:, k] == e).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            h = x[rows] @ w1[e]
            if b1 is not None:
                h = h + b1[e]
            o = hidden(h, activation) @ w2[e]
            if b2 is not None:
                o = o + b2[e]
            # .to: under autocast the expert GEMMs come out in the autocast dtype.
            outs = outs.index_put((rows, torch.full_like(rows, k)), o.to(outs.dtype))
    if combine == "sum":
        return (weights.unsqueeze(-1) * outs).sum(1)
    return torch.logsumexp(outs + torch.log(weights).unsqueeze(-1), dim=1)
