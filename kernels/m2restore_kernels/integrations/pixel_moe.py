"""A module-level drop-in for pixel-wise vision MoE layers: noisy top-K gates (Shazeer et al.,
2017) over experts that are two nn.Linear layers each, as in the M2Restore authors' DDER and many
vision MoEs, run on :func:`m2restore_kernels.topk_softmax` and :func:`m2restore_kernels.moe_mlp`.

Such a layer keeps its experts as a list of MLP modules (``fc1``, an activation, ``fc2``) and
dispatches them with Python index ops per expert; ``PixelMoE.from_linear_experts`` gathers those
weights once into stacked nn.Linear-layout parameters (N, Hd, C) and (N, C_out, Hd), which the op
reads in place on every call. The balance loss terms come with the output: ``importance`` (the
gate weights summed per expert) and ``load`` (Shazeer's smooth load estimate while training with
noise, which the op's (K+1)-th logit gives without a second top-K; the routed row count
otherwise).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..moe import COMBINES, cv_squared, importance, moe_mlp, noisy_topk_load, topk_softmax

__all__ = ["PixelMoE", "MoEOutput", "cv_squared"]

# nn activation modules as moe_mlp names them (nn.GELU only with approximate="none").
_ACTIVATIONS = {nn.GELU: "gelu", nn.SiLU: "silu", nn.ReLU: "relu"}


class MoEOutput(NamedTuple):
    """y in x's shape; importance and load (N,) float32 (float64 for float64)."""
    y: Tensor
    importance: Tensor
    load: Tensor


class PixelMoE(nn.Module):
    """Noisy top-K mixture of N expert MLPs applied to every pixel (row) on its own.

    Experts: ``y_e = w2[e] act(w1[e] x + b1[e]) + b2[e]`` with w1 (N, Hd, C), b1 (N, Hd), w2
    (N, C_out, Hd), b2 (N, C_out), nn.Linear's layout. Gate, on ``gate_input`` (x itself by
    default, G features): clean logits ``gate_input @ w_gate (+ logit_bias)``; while training with
    ``noisy=True``, noisy logits ``clean + noise * (softplus(gate_input @ w_noise) + noise_epsilon)``;
    the K largest are kept and softmaxed (``topk_softmax``). The K outputs combine with
    ``combine="sum"`` (sum_k w_k y_k) or ``"logsumexp"`` (log sum_k w_k exp(y_k)).
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: int, num_experts: int, k: int,
                 gate_features: Optional[int] = None, noisy: bool = True, activation: str = "gelu",
                 combine: str = "sum", bias: bool = True, noise_epsilon: float = 1e-2, backend: str = "auto"):
        super().__init__()
        if not 1 <= k <= num_experts:
            raise ValueError(f"PixelMoE: k must be in [1, num_experts={num_experts}], got {k}")
        if combine not in COMBINES:
            raise ValueError(f"PixelMoE: combine must be one of {COMBINES}, got {combine!r}")
        N, G = num_experts, gate_features or in_features
        self.k, self.noisy, self.activation, self.combine = k, noisy, activation, combine
        self.noise_epsilon, self.backend = noise_epsilon, backend
        self.w1 = nn.Parameter(torch.empty(N, hidden_features, in_features))
        self.w2 = nn.Parameter(torch.empty(N, out_features, hidden_features))
        self.b1 = nn.Parameter(torch.zeros(N, hidden_features)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(N, out_features)) if bias else None
        self.w_gate = nn.Parameter(torch.zeros(G, N))
        self.w_noise = nn.Parameter(torch.zeros(G, N)) if noisy else None
        for w in (self.w1, self.w2):  # nn.Linear's default initialisation, per expert
            for e in range(N):
                nn.init.kaiming_uniform_(w[e], a=5 ** 0.5)

    @classmethod
    def from_linear_experts(cls, experts: Sequence[nn.Module], w_gate: Tensor, w_noise: Optional[Tensor], k: int,
                            **kwargs) -> "PixelMoE":
        """A PixelMoE holding copies of ``experts`` (modules with nn.Linear ``fc1`` and ``fc2`` and an
        activation module ``act``: nn.GELU, nn.SiLU or nn.ReLU), stacked once, and of the gate
        matrices w_gate and w_noise (G, N) (w_noise None: no noise). Build the optimizer after
        converting: the stacked parameters are new tensors."""
        experts = list(experts)
        fc1, fc2 = experts[0].fc1, experts[0].fc2
        act = getattr(experts[0], "act", None)
        activation = _ACTIVATIONS.get(type(act))
        if activation is None or (isinstance(act, nn.GELU) and act.approximate != "none"):
            raise ValueError(f"PixelMoE.from_linear_experts: experts' act must be one of nn.GELU(), nn.SiLU, nn.ReLU, "
                             f"got {act!r}")
        shapes = {(m.fc1.weight.shape, m.fc2.weight.shape, m.fc1.bias is None, type(m.act)) for m in experts}
        if len(shapes) != 1:
            raise ValueError(f"PixelMoE.from_linear_experts: experts must share one shape, bias use and activation, "
                             f"got {sorted(map(str, shapes))}")
        moe = cls(fc1.in_features, fc1.out_features, fc2.out_features, len(experts), k, gate_features=w_gate.shape[0],
                  noisy=w_noise is not None, activation=activation, bias=fc1.bias is not None, **kwargs)
        moe = moe.to(device=fc1.weight.device, dtype=fc1.weight.dtype)
        with torch.no_grad():
            moe.w1.copy_(torch.stack([m.fc1.weight for m in experts]))
            moe.w2.copy_(torch.stack([m.fc2.weight for m in experts]))
            if moe.b1 is not None:
                moe.b1.copy_(torch.stack([m.fc1.bias for m in experts]))
                moe.b2.copy_(torch.stack([m.fc2.bias for m in experts]))
            moe.w_gate.copy_(w_gate)
            if w_noise is not None:
                moe.w_noise.copy_(w_noise)
        return moe

    def forward(self, x: Tensor, gate_input: Optional[Tensor] = None, logit_bias: Optional[Tensor] = None,
                noise: Optional[Tensor] = None) -> MoEOutput:
        """x (P, C) rows or (B, C, H, W) maps (each pixel a row); gate_input likewise with G
        features (default x); logit_bias (P, N) added to the clean logits; noise (P, N) the
        standard normal sample of the noisy gate (default a fresh one)."""
        maps = x.dim() == 4
        rows = self._rows(x)
        gate_rows = rows if gate_input is None else self._rows(gate_input)
        clean = gate_rows @ self.w_gate
        if logit_bias is not None:
            clean = clean + logit_bias
        noisy = self.noisy and self.training
        N = clean.shape[1]
        if noisy:
            std = F.softplus(gate_rows @ self.w_noise) + self.noise_epsilon
            logits = clean + (torch.randn_like(clean) if noise is None else noise) * std
        else:
            logits = clean
        with_load = noisy and self.k < N
        routed = topk_softmax(logits, self.k, self.backend, return_next=with_load)
        weights, indices = routed[:2]
        imp = importance(weights, indices, N)
        if with_load:
            load = noisy_topk_load(clean, logits, std, indices, routed[2])
        else:
            load = torch.bincount(indices.reshape(-1), minlength=N).to(imp.dtype)
        y = moe_mlp(rows, weights, indices, self.w1, self.b1, self.w2, self.b2, self.combine, self.backend,
                    activation=self.activation, layout="linear", check_indices=False)
        if maps:
            B, _, H, W = x.shape
            y = y.view(B, H, W, -1).permute(0, 3, 1, 2)
        return MoEOutput(y, imp, load)

    @staticmethod
    def _rows(t: Tensor) -> Tensor:
        """(B, C, H, W) -> (B*H*W, C) rows in (b, h, w) order; (P, C) as is."""
        if t.dim() == 4:
            return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
        if t.dim() != 2:
            raise ValueError(f"PixelMoE: inputs must be (P, C) rows or (B, C, H, W) maps, got shape {tuple(t.shape)}")
        return t
