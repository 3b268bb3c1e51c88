"""The whole network: shapes, determinism, routing, gradients, parameter count, input checks."""
from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
import torch.nn as nn

from m2restore import M2Restore, M2RestoreConfig, NullPrior
from m2restore.losses import M2RestoreLoss, m2restore_loss

K_EXPERTS = 2


def tiny_model(seed: int = 0, **overrides) -> M2Restore:
    torch.manual_seed(seed)
    config = M2RestoreConfig.tiny(backend="torch", **overrides)
    return M2Restore(config, prior=NullPrior(config.num_degradations, config.prior_dim))


def random_prior(batch: int, config: M2RestoreConfig, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    d_g = torch.softmax(torch.randn(batch, config.num_degradations, generator=g), dim=-1)
    return d_g, torch.randn(batch, config.prior_dim, generator=g)


@pytest.fixture(scope="module")
def model() -> M2Restore:
    return tiny_model().eval()


@pytest.mark.parametrize("shape", [(1, 3, 37, 53), (2, 3, 8, 8), (1, 3, 1, 1)])
def test_any_size_restores_to_the_same_size(model, shape):
    x = torch.rand(*shape)
    with torch.no_grad():
        y, aux = model(x, return_aux=True)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    # Routing maps live at the padded resolution of each level.
    ph, pw = -(-shape[2] // 8) * 8, -(-shape[3] // 8) * 8
    assert [r.shape for r in aux.routing] == [(shape[0], 6, ph >> l, pw >> l) for l in range(3)]


def test_eval_is_deterministic_and_batch_independent(model):
    torch.manual_seed(3)
    x = torch.rand(3, 3, 24, 40)
    prior = random_prior(3, model.config)
    with torch.no_grad():
        batched = model(x, prior=prior)
        again = model(x, prior=prior)
        alone = torch.cat([model(x[i:i + 1], prior=(prior[0][i:i + 1], prior[1][i:i + 1])) for i in range(3)])
    assert torch.equal(batched, again)
    torch.testing.assert_close(alone, batched, rtol=0, atol=1e-5)


@pytest.mark.parametrize("train", [False, True])
def test_every_pixel_has_k_experts_with_weights_summing_to_one(model, train):
    model.train(train)
    try:
        with torch.no_grad():
            _, aux = model(torch.rand(2, 3, 32, 24), return_aux=True)
    finally:
        model.eval()
    assert len(aux.routing) == 3
    for gates in aux.routing:
        assert (gates > 0).sum(dim=1).eq(K_EXPERTS).all()
        torch.testing.assert_close(gates.sum(dim=1), torch.ones_like(gates[:, 0]), rtol=0, atol=1e-6)


def test_training_routing_is_noisy_and_eval_routing_is_not():
    model = tiny_model()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        model.train()
        first = model(x, return_aux=True)[1].routing
        second = model(x, return_aux=True)[1].routing
        model.eval()
        clean = [model(x, return_aux=True)[1].routing for _ in range(2)]
    assert all(not torch.equal(a, b) for a, b in zip(first, second))
    assert all(torch.equal(a, b) for a, b in zip(*clean))


def test_one_training_step_changes_every_trainable_parameter():
    model = tiny_model(seed=5).train()
    # AFLB's output gate `a` starts at 0 (AdaIR), which by design blocks every gradient into the rest
    # of the block on the first step; open it so that the step can reach all of them.
    for level in model.decoder:
        nn.init.constant_(level.aflb.a, 0.5)
    # AFLB's thresholds only set an integer box size: no gradient reaches them (as in AdaIR).
    frozen_by_design = {n for n, _ in model.named_parameters() if ".aflb.rate_conv." in n}
    assert len(frozen_by_design) == 6
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    torch.manual_seed(0)
    # 64×64: the latent AFLB's low-frequency box must be non-empty for its low branch to get a gradient.
    x, target = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    restored, aux = model(x, prior=random_prior(2, model.config), return_aux=True)
    loss = M2RestoreLoss(model.config.balance_weight)(restored, target, aux.balance_loss)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert sorted(no_grad) == sorted(frozen_by_design)
    # Adam's first step moves every parameter with a non-zero gradient by about lr, however small
    # the gradient (some are ~1e-10 here, below what a plain SGD step can change).
    torch.optim.Adam(model.parameters(), lr=2e-4).step()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert sorted(unchanged) == sorted(frozen_by_design)


def test_loss_is_l1_plus_weighted_balance():
    restored = torch.tensor([[[[0.0, 1.0], [0.5, 0.25]]]])
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    # mean(|−1|, 0, 0.5, 0.25) = 0.4375; + 0.01 · 3
    assert m2restore_loss(restored, target, torch.tensor(3.0)).item() == pytest.approx(0.4675)
    assert M2RestoreLoss()(restored, target, torch.tensor(3.0)).item() == pytest.approx(0.4675)


def _paper_parameter_count() -> int:
    """The parameter count of docs/design.md#network-defaults, layer by layer."""
    def ln(c): return 2 * c                              # weight + bias
    def hid(c): return int(c * 2.66)                      # GDFN and expert hidden width

    def tb(c, heads):
        mdta = 3 * c * c + 3 * c * 9 + c * c + heads      # qkv 1×1, depthwise 3×3, out 1×1, temperature
        gdfn = c * 2 * hid(c) + 2 * hid(c) * 9 + hid(c) * c
        return 2 * ln(c) + mdta + gdfn

    def dder(c, n=6, d=6):
        return (256 * c + c                               # Linear(256→C) of the task prompt
                + 2 * c * n + 2 * c * n                   # W_g, W_n
                + d * n + n + n                           # W_b, b_b, α
                + n * (c * hid(c) + hid(c) + hid(c) * c + c))  # experts with biases

    def mcdb(c, d_state=16, d_conv=4, expand=2):
        di, r = expand * c, -(-c // 16)
        mamba = (2 * di * c + di * d_conv + di + (r + 2 * d_state) * di + di * r + di
                 + di * d_state + di + c * di)
        dgf = 9 * c + c + (512 * 4 * c + 4 * c + 4 * c * c + c) + (2 * c * c + c) + (c + 1)
        gdfn = c * 2 * hid(c) + 2 * hid(c) * 9 + hid(c) * c
        return ln(c) + ln(c) + mamba + ln(c) + dgf + ln(c) + gdfn

    def cross(c, heads=4): return c * c + 9 * c + 2 * c * c + 18 * c + c * c + heads

    def aflb(c):
        return (27 * c + c * (c // 8) + (c // 8) * 2      # image conv, threshold MLP
                + 3 * cross(c)                           # low, high, aggregate cross-attentions
                + 2 * 49 + 2 * c * (c // 16) + c * c + c  # spatial gate, channel gate, proj
                + 2 * c)                                  # a, b

    tpgs = (3 * 64 * 9 + 64) + (64 * 64 * 9 + 64) + 2 * (64 * 64 + 64) + (64 * 32 + 32) + (32 * 32 + 32) + 32 * 256
    total = tpgs + 3 * 48 * 9                                              # patch embed
    total += dder(48) + 4 * tb(48, 1) + 9 * 48 * 24                        # enc 1 + down
    total += dder(96) + 6 * tb(96, 2) + 9 * 96 * 48                        # enc 2 + down
    total += dder(192) + 6 * tb(192, 4) + 9 * 192 * 96                     # enc 3 + down
    total += 8 * mcdb(384)                                                 # latent
    total += aflb(384) + 9 * 384 * 768 + 384 * 192 + 6 * tb(192, 4)        # dec 3
    total += aflb(192) + 9 * 192 * 384 + 192 * 96 + 6 * tb(96, 2)          # dec 2
    total += aflb(96) + 9 * 96 * 192 + 4 * tb(96, 1)                       # dec 1 (no reduce)
    total += 4 * tb(96, 1) + 96 * 3 * 9                                    # refinement + output
    return total


def test_paper_parameter_count_matches_the_spec_table():
    model = M2Restore(M2RestoreConfig.paper(), prior=NullPrior(6))
    assert sum(p.numel() for p in model.parameters()) == _paper_parameter_count()


@pytest.mark.parametrize("make_input, message", [
    (lambda: torch.rand(3, 16, 16), "4-D"),
    (lambda: torch.rand(1, 4, 16, 16), "3 \\(RGB\\) channels"),
    (lambda: torch.randint(0, 255, (1, 3, 16, 16), dtype=torch.uint8), "floating-point"),
])
def test_bad_images_raise_value_error(model, make_input, message):
    with pytest.raises(ValueError, match=message):
        model(make_input())


@pytest.mark.parametrize("d_g_shape, p_f_shape, name", [((1, 5), (1, 512), "d_g"), ((1, 6), (1, 256), "P_f"),
                                                        ((2, 6), (2, 512), "d_g")])
def test_prior_of_the_wrong_shape_raises_value_error(model, d_g_shape, p_f_shape, name):
    with pytest.raises(ValueError, match=f"{name} must have shape"):
        model(torch.rand(1, 3, 16, 16), prior=(torch.rand(*d_g_shape), torch.rand(*p_f_shape)))


def test_missing_prior_warns_once_and_explicit_prior_does_not():
    config = M2RestoreConfig.tiny(backend="torch")
    with pytest.warns(UserWarning, match="NullPrior .* carry no signal") as record:
        M2Restore(config)
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M2Restore(config, prior=NullPrior(6))


def test_precomputed_prior_equals_the_prior_module(model):
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x, prior=NullPrior(6)(x)), model(x), rtol=0, atol=0)
        # and the prior reaches the output (DDER bias, DGF prompt)
        assert not torch.allclose(model(x, prior=random_prior(2, model.config)), model(x))


class _ModulePrior(nn.Module):
    """A frozen module prior with weights of its own, like DA-CLIP."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 6 + 512)
        self.requires_grad_(False)

    def forward(self, images):
        out = self.proj(images.mean(dim=(2, 3)))
        return torch.softmax(out[:, :6], -1), out[:, 6:]


def test_a_module_prior_is_not_in_the_weights_but_moves_with_the_model():
    prior = _ModulePrior()
    model = M2Restore(M2RestoreConfig.tiny(backend="torch"), prior=prior)
    assert not any(k.startswith(("prior", "_prior")) or "proj.weight" == k for k in model.state_dict())
    assert all(p is not prior.proj.weight for p in model.parameters())
    model.to(torch.float64)  # a device move goes through the same Module._apply
    assert prior.proj.weight.dtype == torch.float64 and model.patch_embed.weight.dtype == torch.float64
    assert model.eval()(torch.rand(1, 3, 8, 8, dtype=torch.float64)).dtype == torch.float64


def test_reference_and_torch_backends_agree():
    fast = tiny_model(seed=2).eval()
    ref = M2Restore(dataclasses.replace(fast.config, backend="reference"), prior=fast.prior).eval()
    ref.load_state_dict(fast.state_dict())
    x = torch.rand(2, 3, 24, 16)
    prior = random_prior(2, fast.config)
    with torch.no_grad():
        torch.testing.assert_close(fast(x, prior=prior), ref(x, prior=prior), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("switches", [dict(combine="logsumexp"), dict(noise_mask=False), dict(alpha="scalar"),
                                      dict(gate_weights_cnn=False)])
def test_public_code_switches_build_and_run(switches):
    model = tiny_model(**switches)
    restored, aux = model.train()(torch.rand(1, 3, 16, 16), return_aux=True)
    assert restored.shape == (1, 3, 16, 16) and torch.isfinite(restored).all() and aux.balance_loss.ndim == 0
    if "alpha" in switches:
        assert model.encoder[0].dder.alpha.shape == ()


def test_config_round_trips_through_json():
    config = M2RestoreConfig.tiny(combine="logsumexp", degradation_names=("a", "b", "c"), backend="reference")
    assert M2RestoreConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert M2RestoreConfig.from_dict(json.loads(json.dumps(M2RestoreConfig.paper().to_dict()))) == M2RestoreConfig()
    with pytest.raises(ValueError, match="unknown M2RestoreConfig fields: \\['widht'\\]"):
        M2RestoreConfig.from_dict({**config.to_dict(), "widht": 3})
    with pytest.raises(ValueError, match="backend"):
        M2RestoreConfig.tiny(backend="cuda")
