"""The module-level drop-in for pixel-wise vision MoE layers (integrations.pixel_moe.PixelMoE)
against a float64 formula of the M2Restore authors' layer shape, written out here: per-expert
nn.Linear MLPs, a noisy top-K gate on [x, prompt] with a per-image logit bias, Shazeer's smooth
load, the cv^2 balance loss on importance and load, and the log-sum-exp of gated exp outputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from m2restore_kernels.integrations.pixel_moe import PixelMoE, cv_squared

B, C, H, W, N, K, HIDDEN = 2, 8, 5, 6, 6, 2, 21


class Expert(nn.Module):
    def __init__(self, act: nn.Module):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(C, HIDDEN), act, nn.Linear(HIDDEN, C)


def _layer(seed: int, act: nn.Module = None):
    """float64 experts and gate matrices of the authors' shape (gate on 2C features)."""
    torch.manual_seed(seed)
    experts = nn.ModuleList(Expert(act or nn.GELU()) for _ in range(N)).double()
    w_gate = torch.randn(2 * C, N, dtype=torch.float64)
    w_noise = 0.3 * torch.randn(2 * C, N, dtype=torch.float64)
    return experts, w_gate, w_noise


def _formula(x, prompt, bias, noise, experts, w_gate, w_noise, training: bool):
    """The layer in float64, pixel rows in (b, h, w) order: (y map, importance, load, balance loss)."""
    rows = x.permute(0, 2, 3, 1).reshape(-1, C)
    gate_in = torch.cat([rows, prompt.repeat_interleave(H * W, 0)], 1)
    clean = gate_in @ w_gate + bias
    std = F.softplus(gate_in @ w_noise) + 1e-2
    logits = clean + noise * std if training else clean
    top, idx = logits.topk(K + 1, dim=1)
    gates = torch.zeros_like(logits).scatter(1, idx[:, :K], torch.softmax(top[:, :K], 1))
    if training:
        normal = torch.distributions.Normal(0.0, 1.0)
        p_in, p_out = normal.cdf((clean - top[:, K:]) / std), normal.cdf((clean - top[:, K - 1:K]) / std)
        load = torch.where(logits > top[:, K:], p_in, p_out).sum(0)
    else:
        load = (gates > 0).sum(0).double()
    outs = torch.stack([m.fc2(m.act(m.fc1(rows))) for m in experts], 1)  # (P, N, C)
    y = torch.log((gates.unsqueeze(-1) * outs.exp()).sum(1))
    importance = gates.sum(0)
    loss = importance.var() / importance.mean() ** 2 + load.var() / load.mean() ** 2
    return y.view(B, H, W, C).permute(0, 3, 1, 2), importance, load, loss


@pytest.mark.parametrize("training", [True, False], ids=["train-noisy", "eval"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_pixel_moe_matches_the_float64_layer(training, backend):
    experts, w_gate, w_noise = _layer(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    prompt = torch.randn(B, C, generator=g, dtype=torch.float64)
    bias = 0.5 * torch.randn(B, N, generator=g, dtype=torch.float64).repeat_interleave(H * W, 0)
    noise = torch.randn(B * H * W, N, generator=g, dtype=torch.float64)
    ref_params = [p.requires_grad_() for p in (w_gate, w_noise)]
    x_ref = x.clone().requires_grad_()
    y_ref, imp_ref, load_ref, loss_ref = _formula(x_ref, prompt, bias, noise, experts, *ref_params, training)

    moe = PixelMoE.from_linear_experts(experts, w_gate.detach(), w_noise.detach(), K, combine="logsumexp",
                                       backend=backend).float().train(training)
    x_got = x.float().requires_grad_()
    gate_input = torch.cat([x_got, prompt.float()[:, :, None, None].expand(B, C, H, W)], 1)
    y, imp, load = moe(x_got, gate_input, bias.float(), noise.float())
    loss = cv_squared(imp) + cv_squared(load)
    assert y.shape == x.shape and y.dtype == torch.float32
    for got, want, what, tol in [(y, y_ref, "y", 1e-4), (imp, imp_ref, "importance", 1e-4),
                                 (load, load_ref, "load", 1e-4), (loss, loss_ref, "balance loss", 1e-3)]:
        torch.testing.assert_close(got.double(), want.detach(), rtol=tol, atol=tol, msg=what)

    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    total_ref = (y_ref * dy).sum() + loss_ref
    total = (y * dy.float()).sum() + loss
    ref_w = [p for p in ref_params if training or p is w_gate]
    ours_w = [moe.w_gate] + ([moe.w_noise] if training else [])
    grads_ref = torch.autograd.grad(total_ref, [x_ref, *ref_w] + [m.fc1.weight for m in experts]
                                    + [m.fc2.bias for m in experts])
    grads = torch.autograd.grad(total, [x_got, *ours_w, moe.w1, moe.b2])
    stacked_ref = [*grads_ref[:1 + len(ref_w)], torch.stack(grads_ref[1 + len(ref_w):1 + len(ref_w) + N]),
                   torch.stack(grads_ref[1 + len(ref_w) + N:])]
    for got, want, what in zip(grads, stacked_ref, ["x", "w_gate", "w_noise", "w1", "b2"][:len(grads)]):
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-4 * scale, msg=what)


def test_pixel_moe_rows_silu_experts_sum_combine():
    """(P, C) rows, SiLU experts, sum combine, no noise: the expert mixture written out."""
    experts, w_gate, _ = _layer(3, nn.SiLU())
    moe = PixelMoE.from_linear_experts(experts, w_gate[:C], None, K, backend="torch")
    x = torch.randn(40, C, dtype=torch.float64)
    y, imp, load = moe(x)
    vals, idx = (x @ w_gate[:C]).topk(K, dim=1)
    w = torch.softmax(vals, 1)
    want = sum(w[:, k:k + 1] * torch.stack([experts[e].fc2(F.silu(experts[e].fc1(x[p])))
                                             for p, e in enumerate(idx[:, k].tolist())]) for k in range(K))
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-12)
    assert torch.equal(load, torch.bincount(idx.reshape(-1), minlength=N).double())


def test_pixel_moe_rejects_what_it_cannot_run():
    experts, w_gate, w_noise = _layer(4, nn.Tanh())
    with pytest.raises(ValueError, match="act must be one of"):
        PixelMoE.from_linear_experts(experts, w_gate, w_noise, K)
    experts, w_gate, w_noise = _layer(4)
    experts[2].fc1 = nn.Linear(C, HIDDEN + 1).double()
    with pytest.raises(ValueError, match="experts must share one shape"):
        PixelMoE.from_linear_experts(experts, w_gate, w_noise, K)
    with pytest.raises(ValueError, match="k must be in"):
        PixelMoE(C, HIDDEN, C, N, N + 1)
