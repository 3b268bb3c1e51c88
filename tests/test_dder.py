"""DDER: router formula, noisy top-K with the Bernoulli switch, experts, balance loss, compile."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from m2restore import M2RestoreConfig
from m2restore.modules.dder import DDER, balance_loss

DIM = 8


def make_dder(seed: int = 0, **overrides) -> DDER:
    torch.manual_seed(seed)
    return DDER(DIM, M2RestoreConfig.tiny(backend="torch", **overrides))


def inputs(batch: int = 2, h: int = 6, w: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    config = M2RestoreConfig.tiny()
    x = torch.randn(batch, DIM, h, w, generator=g)
    prompt = torch.randn(batch, config.prompt_dim, generator=g)
    d_g = torch.softmax(torch.randn(batch, config.num_degradations, generator=g), -1)
    return x, prompt, d_g


def joint(dder: DDER, x, prompt):
    """x_p = [x ; Linear(T)] per pixel, (B, H·W, 2C), row-major pixels."""
    b, c, h, w = x.shape
    t = dder.prompt_proj(prompt)[:, None, :].expand(b, h * w, c)
    return torch.cat([x.flatten(2).transpose(1, 2), t], dim=-1)


def expected_forward(dder: DDER, x, prompt, d_g, combine: str):
    """Float64 DDER of eval mode, dense: every expert on every pixel, then the K best by S."""
    d = {n: p.detach().double() for n, p in dder.named_parameters()}
    x, prompt, d_g = x.double(), prompt.double(), d_g.double()
    b, c, h, w = x.shape
    tokens = x.flatten(2).transpose(1, 2)                                            # (B, L, C)
    t = (prompt @ d["prompt_proj.weight"].T + d["prompt_proj.bias"])[:, None].expand(b, h * w, c)
    s = torch.cat([tokens, t], -1) @ d["w_gate"]
    s = s + (d["alpha"] * (d_g @ d["degradation_proj.weight"].T + d["degradation_proj.bias"]))[:, None]
    top, idx = s.topk(dder.top_k, dim=-1)
    gates = torch.zeros_like(s).scatter(-1, idx, torch.softmax(top, -1))            # (B, L, N)
    experts = torch.stack([F.gelu(tokens @ d["w1"][e] + d["b1"][e]) @ d["w2"][e] + d["b2"][e]
                           for e in range(dder.num_experts)], dim=-2)               # (B, L, N, C)
    if combine == "sum":
        y = (gates[..., None] * experts).sum(-2)
    else:
        y = torch.log((gates[..., None] * experts.exp()).sum(-2))
    return x + y.transpose(1, 2).reshape(b, c, h, w), gates


@pytest.mark.parametrize("combine", ["sum", "logsumexp"])
@pytest.mark.parametrize("alpha", ["vector", "scalar"])
def test_eval_forward_matches_a_float64_dense_computation(combine, alpha):
    dder = make_dder(combine=combine, alpha=alpha).eval()
    with torch.no_grad():
        dder.alpha.uniform_(0.2, 2.0)  # a non-trivial α (per expert in the vector case)
    x, prompt, d_g = inputs()
    with torch.no_grad():
        out, bal, routing = dder(x, prompt, d_g)
        ref, gates = expected_forward(dder, x, prompt, d_g, combine)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(routing.flatten(2).transpose(1, 2).double(), gates, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bal, balance_loss(routing.permute(0, 2, 3, 1).reshape(-1, 6)))


@pytest.mark.parametrize("train", [False, True])
def test_exactly_k_gates_per_pixel_summing_to_one(train):
    dder = make_dder().train(train)
    with torch.no_grad():
        _, _, routing = dder(*inputs(h=9, w=7))
    assert routing.shape == (2, 6, 9, 7)
    assert ((routing > 0).sum(1) == 2).all()
    torch.testing.assert_close(routing.sum(1), torch.ones(2, 9, 7), rtol=0, atol=1e-6)


def _noise(dder: DDER, x_p, d_g):
    """S̃ − S: training logits minus the eval logits of the same input."""
    with torch.no_grad():
        clean = dder.eval().router_logits(x_p, d_g)
        noisy = dder.train().router_logits(x_p, d_g)
    return noisy - clean


def test_bernoulli_mask_removes_the_noise_of_about_half_the_experts_per_pixel():
    x, prompt, d_g = inputs(batch=4, h=32, w=32)
    masked, unmasked = make_dder(noise_mask=True), make_dder(noise_mask=False)
    unmasked.load_state_dict(masked.state_dict())
    with torch.no_grad():
        x_p = joint(masked, x, prompt)
    torch.manual_seed(7)
    noise = _noise(masked, x_p, d_g)
    absent = noise == 0  # exactly: S + 0 = S, while σ ≥ 0.01 and randn is never 0
    assert 0.47 < absent.float().mean() < 0.53  # ε ~ Bernoulli(0.5), 24576 draws
    assert absent.any(-1).float().mean() > 0.9 and (~absent).any(-1).float().mean() > 0.9  # per pixel
    torch.manual_seed(7)
    assert (_noise(unmasked, x_p, d_g) != 0).all()
    with torch.no_grad():
        assert torch.equal(masked.eval().router_logits(x_p, d_g), masked.eval().router_logits(x_p, d_g))


def test_noise_scale_is_softplus_of_the_noise_projection_plus_the_floor():
    dder = make_dder(noise_mask=False)
    with torch.no_grad():
        dder.w_noise.normal_()
    x, prompt, d_g = inputs(batch=8, h=32, w=32)
    with torch.no_grad():
        x_p = joint(dder, x, prompt)
        sigma = F.softplus(x_p @ dder.w_noise) + 0.01
    torch.manual_seed(0)
    standardised = _noise(dder, x_p, d_g) / sigma
    # standard normal: mean 0, variance 1 (n = 49152 draws)
    assert abs(standardised.mean().item()) < 0.03
    assert abs(standardised.var().item() - 1) < 0.03


def test_training_routing_is_noisy_and_eval_routing_is_deterministic():
    dder = make_dder()
    x, prompt, d_g = inputs(h=16, w=16)
    with torch.no_grad():
        train = [dder.train()(x, prompt, d_g)[2] for _ in range(2)]
        evals = [dder.eval()(x, prompt, d_g)[2] for _ in range(2)]
    assert not torch.equal(*train)
    assert torch.equal(*evals)


def test_balance_loss_matches_hand_computation():
    # importance (1.3, 0.9, 0.8): mean 1, unbiased var (0.09 + 0.01 + 0.04) / 2 = 0.07; load (2, 2, 2): 0
    balanced_load = torch.tensor([[0.6, 0.4, 0.0], [0.7, 0.0, 0.3], [0.0, 0.5, 0.5]])
    assert balance_loss(balanced_load).item() == pytest.approx(0.07, rel=1e-6)
    # importance (1.8, 0.7, 0.5): var (0.64 + 0.09 + 0.25) / 2 = 0.49; load (3, 2, 1): var 1 / mean² 4
    skewed = torch.tensor([[0.6, 0.4, 0.0], [0.7, 0.3, 0.0], [0.5, 0.0, 0.5]])
    assert balance_loss(skewed).item() == pytest.approx(0.49 + 0.25, rel=1e-6)
    # the importance term carries the gradient: d/dw of var(w)/mean(w)² with mean 1 is 2(w − 1)/(n − 1)
    g = skewed.clone().requires_grad_(True)
    balance_loss(g).backward()
    expected = torch.tensor([0.8, -0.3, -0.5]) * 2 / 2 - 2 * 0.49 / 3  # − 2·var/mean³ · ∂mean/∂w
    torch.testing.assert_close(g.grad, expected.expand(3, 3), rtol=1e-5, atol=1e-6)


def test_torch_compile_matches_eager():
    dder = make_dder().eval()
    x, prompt, d_g = inputs(h=8, w=8)
    compiled = torch.compile(dder, fullgraph=True)
    with torch.no_grad():
        eager = dder(x, prompt, d_g)
        again = compiled(x, prompt, d_g)
    for a, b in zip(eager, again):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
