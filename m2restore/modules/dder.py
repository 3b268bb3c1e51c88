"""DDER: degradation-aware dynamic expert routing, a pixel-wise noisy top-K mixture of experts.

Per pixel p of a feature map x (B, C, H, W), with the image's task prompt T and DA-CLIP's d_g:

    x_p = [x ; Linear(T)]                                      (2C)       paper eq. 3
    S   = x_p W_g + α ⊙ (d_g W_b + b_b)                        (N)        eqs. 4-6
    S̃   = S + ε ⊙ σ ⊙ n,  σ = softplus(x_p W_n) + floor,       training only, eqs. 7-9
          n ~ N(0, 1), ε ~ Bernoulli(p) per pixel and expert (ε = 1 with noise_mask=False);
          floor = config.noise_floor (0.01), p = config.noise_keep_prob (0.5)
    g   = softmax over the K largest S̃ (the others are out)   eqs. 10-11
    out = x + Σ_k g_k E_k(x)      (or log Σ_k g_k exp(E_k(x)) with combine="logsumexp")

E_n: Linear(C→int(2.66C)) → GELU → Linear(→C). Balance loss: cv²(importance) + cv²(load) over all
pixels of the batch (paper's L_balance). The paper does not define the load; in training it is by
default the smooth estimator of Shazeer et al.'s noisy top-K gating (:func:`smooth_load`, as in the
authors' code), which carries a gradient to the router; ``balance_load="count"`` counts the pixels
routed to each expert (no gradient), which is also the load in eval mode. In a data-parallel run
the importance and load of training forwards are summed over the processes before the cv²
(:func:`m2restore.distributed.global_batch`), so the loss is that of the global batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from m2restore_kernels.moe import cv_squared, noisy_topk_load

from .. import distributed, ops
from ..config import M2RestoreConfig


def smooth_load(clean: torch.Tensor, noisy: torch.Tensor, sigma: torch.Tensor, k: int,
                keep_prob: float = 1.0, routed: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The expected number of pixels routed to each expert under the routing noise, (N,).

    clean, noisy, sigma (P, N): router logits before and after the noise, and the noise scale;
    1 <= k < N. For pixel p and expert n, with the other experts' noisy logits held fixed, the
    expert is in the top k when its own noisy logit beats thr[p, n], the k-th largest of the
    others (the (k+1)-th of all when n is in the top k, the k-th otherwise). Its noise is σ·z,
    z ~ N(0, 1), kept with probability ``keep_prob`` (the Bernoulli mask; 1 without it), so

        load[n] = Σ_p keep_prob·Φ((clean − thr)/σ) + (1 − keep_prob)·[clean > thr]

    which is differentiable in clean, sigma and (through thr) noisy. ``routed``: (indices (P, k),
    (k+1)-th logit (P,)) of the routing's own ``ops.topk_softmax(noisy, k, return_next=True)``, so no
    second top-k runs; without it one is taken here. float32 (float64 for float64): the formula is
    ``m2restore_kernels.moe.noisy_topk_load``'s.
    """
    if routed is None:
        routed = ops.topk_softmax(noisy, k, "reference", return_next=True)[1:]
    return noisy_topk_load(clean, noisy, sigma, *routed, keep_prob=keep_prob)


def balance_loss(gates: torch.Tensor, eps: float = M2RestoreConfig.balance_eps, load: torch.Tensor | None = None,
                 reduce=None) -> torch.Tensor:
    """gates (P, N) dense routing weights (zeros for unselected experts) -> scalar.

    cv²(importance) + cv²(load); importance[n] = Σ_p gates[p, n]; ``load`` (N,) defaults to the
    count #{p : gates[p, n] > 0}, which carries no gradient (:func:`smooth_load` does). ``reduce``
    maps the stacked (2, N) [importance; load], in float32 or wider, to their sums over the
    processes of a data-parallel run (:func:`m2restore.distributed.batch_reducer`).
    """
    importance = gates.sum(0)
    load = (gates > 0).sum(0) if load is None else load
    if reduce is not None:
        dtype = torch.promote_types(importance.dtype, torch.float32)
        importance, load = reduce(torch.stack([importance.to(dtype), load.to(dtype)]))
    return cv_squared(importance, eps) + cv_squared(load, eps)


class DDER(nn.Module):
    """forward(x (B, C, H, W), task_prompt (B, prompt_dim), d_g (B, D)) -> (out, balance_loss, routing).

    out (B, C, H, W); balance_loss a float32 scalar; routing (B, N, H, W) the dense gate weights.
    """

    def __init__(self, dim: int, config: M2RestoreConfig):
        super().__init__()
        n, c2 = config.num_experts, 2 * dim
        hidden = int(dim * config.expert_ratio)
        self.top_k = config.top_k
        self.combine = config.combine
        self.noise_mask = config.noise_mask
        self.noise_floor = config.noise_floor
        self.noise_keep_prob = config.noise_keep_prob
        self.balance_eps = config.balance_eps
        self.balance_load = config.balance_load
        self.backend = ops.check_backend(config.backend)

        self.prompt_proj = nn.Linear(config.prompt_dim, dim)
        # Unit-normal router as in the authors' code; the noise scale starts at softplus(0) + floor.
        self.w_gate = nn.Parameter(torch.randn(c2, n))
        self.w_noise = nn.Parameter(torch.zeros(c2, n))
        self.degradation_proj = nn.Linear(config.num_degradations, n)  # W_b, b_b
        self.alpha = nn.Parameter(torch.full((n,) if config.alpha == "vector" else (), config.alpha_init))
        # Experts stacked in the layout of m2restore_kernels.moe_mlp, initialised like nn.Linear.
        self.w1 = nn.Parameter(torch.empty(n, dim, hidden))
        self.b1 = nn.Parameter(torch.empty(n, hidden))
        self.w2 = nn.Parameter(torch.empty(n, hidden, dim))
        self.b2 = nn.Parameter(torch.empty(n, dim))
        for w, b, fan_in in ((self.w1, self.b1, dim), (self.w2, self.b2, hidden)):
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    @property
    def num_experts(self) -> int:
        return self.w_gate.shape[1]

    def router_logits(self, x_p: torch.Tensor, d_g: torch.Tensor) -> torch.Tensor:
        """x_p (B, L, 2C), d_g (B, D) -> S̃ (B, L, N): S in eval mode, S plus the masked noise in training."""
        return self._router(x_p, d_g)[2]

    def _router(self, x_p: torch.Tensor, d_g: torch.Tensor):
        """-> (x_p W_g, S, S̃, σ), each (B, L, N); in eval mode S̃ is S and σ is None."""
        gate_logits = x_p @ self.w_gate
        logits = gate_logits + (self.alpha * self.degradation_proj(d_g)).unsqueeze(1)
        if not self.training:
            return gate_logits, logits, logits, None
        sigma = F.softplus(x_p @ self.w_noise) + self.noise_floor
        noise = sigma * torch.randn_like(logits)
        if self.noise_mask:
            noise = noise * torch.bernoulli(torch.full_like(logits, self.noise_keep_prob))
        return gate_logits, logits, logits + noise, sigma

    def _smooth_clean(self, gate_logits, logits, sigma):
        """The clean logits (B, L, N) the smooth load measures its margins from, or None where the load
        is the count (eval mode, ``balance_load="count"``, or K = N: nothing to estimate)."""
        if sigma is None or self.balance_load == "count" or self.top_k == self.num_experts:
            return None
        # "smooth_clean" (the authors' code) measures the margin from x_p W_g without the d_g bias.
        return logits if self.balance_load == "smooth" else gate_logits

    def forward(self, x: torch.Tensor, task_prompt: torch.Tensor, d_g: torch.Tensor):
        b, c, h, w = x.shape
        tokens = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
        prompt = self.prompt_proj(task_prompt).unsqueeze(1).expand(b, h * w, c)
        gate_logits, clean, logits, sigma = self._router(torch.cat([tokens, prompt], dim=-1), d_g)

        flat, n = tokens.reshape(b * h * w, c), self.num_experts
        noisy = logits.reshape(-1, n)
        smooth = self._smooth_clean(gate_logits, clean, sigma)
        # The smooth load takes its thresholds from the routing's own top-K: the (K+1)-th logit comes with it.
        routed = ops.topk_softmax(noisy, self.top_k, self.backend, return_next=smooth is not None)
        weights, indices = routed[:2]
        y = ops.moe_mlp(flat, weights, indices, self.w1, self.b1, self.w2, self.b2, self.combine, self.backend)

        gates = torch.zeros_like(noisy).scatter(1, indices, weights)
        out = x + y.reshape(b, h, w, c).permute(0, 3, 1, 2)
        routing = gates.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        load = None
        if smooth is not None:
            keep = self.noise_keep_prob if self.noise_mask else 1.0
            load = smooth_load(smooth.reshape(-1, n), noisy, sigma.reshape(-1, n), self.top_k, keep, routed[1:])
        # Only training forwards reduce: validation and inference run on one process at a time.
        reduce = distributed.batch_reducer() if self.training else None
        return out, balance_loss(gates, self.balance_eps, load, reduce), routing
