"""DDER: router formula, noisy top-K with the Bernoulli switch, experts, balance loss, compile."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from m2restore import M2RestoreConfig
from m2restore.modules.dder import DDER, balance_loss, cv_squared, smooth_load

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


def smooth_load_float64(clean, noisy, sigma, k, keep_prob):
    """The estimator written pixel by pixel and expert by expert: thr = the k-th largest noisy
    logit of the *other* experts; P(in) = q·Φ((clean − thr)/σ) + (1 − q)·[clean > thr]."""
    p_count, n_exp = clean.shape
    load = [0.0] * n_exp
    for p in range(p_count):
        for n in range(n_exp):
            others = sorted((noisy[p, m].item() for m in range(n_exp) if m != n), reverse=True)
            thr = others[k - 1]
            z = (clean[p, n].item() - thr) / sigma[p, n].item()
            phi = 0.5 * (1 + math.erf(z / math.sqrt(2)))
            load[n] += keep_prob * phi + (1 - keep_prob) * float(clean[p, n].item() > thr)
    return torch.tensor(load, dtype=torch.float64)


def _routing_draw(seed, p=40, n=6):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(p, n, generator=g, dtype=torch.float64)
    sigma = 0.2 + torch.rand(p, n, generator=g, dtype=torch.float64)
    noisy = clean + sigma * torch.randn(p, n, generator=g, dtype=torch.float64)
    return clean, noisy, sigma


@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("keep_prob", [1.0, 0.5])
def test_smooth_load_matches_its_formula_in_float64(k, keep_prob):
    clean, noisy, sigma = _routing_draw(k)
    got = smooth_load(clean, noisy, sigma, k, keep_prob)
    torch.testing.assert_close(got, smooth_load_float64(clean, noisy, sigma, k, keep_prob), rtol=1e-14, atol=1e-14)
    # the probabilities of being in the top k add up to k per pixel only in expectation; bounds hold always
    assert (got >= 0).all() and (got <= clean.shape[0]).all()


def test_smooth_load_gradient_matches_finite_differences():
    clean, noisy, sigma = (t.requires_grad_() for t in _routing_draw(3, p=6))
    for keep_prob in (1.0, 0.5):
        assert torch.autograd.gradcheck(lambda c, z, s: smooth_load(c, z, s, 2, keep_prob), (clean, noisy, sigma))
    smooth_load(clean, noisy, sigma, 2).pow(2).sum().backward()
    assert clean.grad.abs().sum() > 0 and sigma.grad.abs().sum() > 0


def test_smooth_load_is_the_probability_of_staying_in_the_top_k():
    # One pixel: redraw expert 0's noise many times with the others fixed and count its top-2 hits.
    clean, noisy, sigma = _routing_draw(11, p=1)
    g = torch.Generator().manual_seed(12)
    draws = 200_000
    redrawn = noisy.repeat(draws, 1)
    redrawn[:, 0] = clean[0, 0] + sigma[0, 0] * torch.randn(draws, generator=g, dtype=torch.float64)
    hits = (redrawn.topk(2, dim=-1).indices == 0).any(-1).double().mean()
    assert abs(hits - smooth_load(clean, noisy, sigma, 2)[0]) < 4e-3  # 4 standard errors of a Bernoulli mean


@pytest.mark.parametrize("load", ["smooth", "smooth_clean", "count"])
def test_training_balance_loss_uses_the_configured_load(load):
    dder = make_dder(balance_load=load, noise_mask=False).train()
    with torch.no_grad():
        dder.degradation_proj.bias.uniform_(-2, 2)  # a bias that "smooth_clean" leaves out
    x, prompt, d_g = inputs()
    torch.manual_seed(5)
    out, bal, routing = dder(x, prompt, d_g)
    # the same noise by hand: one standard-normal draw per pixel and expert, in (b, h, w) pixel order
    torch.manual_seed(5)
    with torch.no_grad():
        x_p = joint(dder, x, prompt)
        gate_logits = x_p @ dder.w_gate
        s = gate_logits + (dder.alpha * dder.degradation_proj(d_g))[:, None]
        sigma = F.softplus(x_p @ dder.w_noise) + 0.01
        noisy = s + sigma * torch.randn_like(s)
    gates = routing.detach().permute(0, 2, 3, 1).reshape(-1, 6)
    assert torch.equal((gates > 0), torch.zeros_like(gates, dtype=torch.bool).scatter(
        1, noisy.reshape(-1, 6).topk(2, -1).indices, True))
    clean = {"smooth": s, "smooth_clean": gate_logits}.get(load)
    if clean is None:
        expected_load = (gates > 0).sum(0).double()
    else:
        expected_load = smooth_load_float64(clean.reshape(-1, 6), noisy.reshape(-1, 6), sigma.reshape(-1, 6), 2, 1.0)
    imp, ld = gates.sum(0).double(), expected_load
    expected = imp.var() / (imp.mean() ** 2 + 1e-10) + ld.var() / (ld.mean() ** 2 + 1e-10)
    torch.testing.assert_close(bal.double(), expected, rtol=1e-5, atol=1e-7)
    # only the smooth load trains the router's gate through the load term: take the importance term away
    load_term = bal - cv_squared(routing.permute(0, 2, 3, 1).reshape(-1, 6).sum(0))
    (grad,) = torch.autograd.grad(load_term, dder.w_gate, allow_unused=True)
    assert (grad is not None and grad.abs().sum() > 0) == (load != "count")


def test_eval_load_is_the_count_whatever_the_setting():
    x, prompt, d_g = inputs()
    with torch.no_grad():
        results = [make_dder(balance_load=load).eval()(x, prompt, d_g) for load in ("smooth", "count")]
    assert torch.equal(results[0][1], results[1][1])
    assert torch.equal(results[0][1], balance_loss(results[0][2].permute(0, 2, 3, 1).reshape(-1, 6)))


def test_logsumexp_combine_stays_finite_where_exp_then_log_overflows():
    dder = make_dder(combine="logsumexp").eval()
    with torch.no_grad():
        dder.b2.fill_(100.0)  # every expert output near 100: exp overflows float32 (max ~ e^88.7)
        x, prompt, d_g = inputs()
        out, _, routing = dder(x, prompt, d_g)
        ref, gates = expected_forward(dder, x, prompt, d_g, "logsumexp")  # float64: no overflow
        experts = torch.stack([F.gelu(x.flatten(2).transpose(1, 2) @ dder.w1[e] + dder.b1[e]) @ dder.w2[e] + dder.b2[e]
                               for e in range(6)], dim=-2)
        chosen = gates[..., None] > 0  # the authors' exp-then-log over the chosen experts
        naive = torch.log(torch.where(chosen, gates.float()[..., None] * experts.exp(), 0).sum(-2))
    assert torch.isinf(naive).any()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-4)
