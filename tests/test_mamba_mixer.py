"""Our Mamba mixer: mamba_ssm.Mamba's parameter layout and init, and its forward against float64."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from m2restore.modules.mcdb import MambaMixer


def test_state_dict_has_exactly_mamba_ssm_keys_and_shapes():
    # mamba_ssm.Mamba(d_model=384, d_state=16, d_conv=4, expand=2): d_inner = 768, dt_rank = ceil(384/16) = 24.
    expected = {
        "in_proj.weight": (1536, 384),      # Linear(d_model, 2·d_inner, bias=False)
        "conv1d.weight": (768, 1, 4),       # Conv1d(d_inner, d_inner, d_conv, groups=d_inner)
        "conv1d.bias": (768,),
        "x_proj.weight": (56, 768),         # Linear(d_inner, dt_rank + 2·d_state, bias=False)
        "dt_proj.weight": (768, 24),        # Linear(dt_rank, d_inner)
        "dt_proj.bias": (768,),
        "A_log": (768, 16),
        "D": (768,),
        "out_proj.weight": (384, 768),      # Linear(d_inner, d_model, bias=False)
    }
    mixer = MambaMixer(384, d_state=16, d_conv=4, expand=2, backend="torch")
    assert {k: tuple(v.shape) for k, v in mixer.state_dict().items()} == expected
    # and a state dict of that layout (as mamba_ssm saves it) loads strictly
    foreign = {k: torch.randn(shape) for k, shape in expected.items()}
    mixer.load_state_dict(foreign, strict=True)
    assert torch.equal(mixer.A_log, foreign["A_log"])


def test_initialisation_follows_mamba_ssm():
    torch.manual_seed(0)
    mixer = MambaMixer(64, d_state=16, backend="torch")  # d_inner 128, dt_rank 4
    assert torch.equal(mixer.A_log, torch.log(torch.arange(1, 17, dtype=torch.float32)).expand(128, 16))
    assert torch.equal(mixer.D, torch.ones(128))
    assert mixer.dt_proj.weight.abs().max() <= 4 ** -0.5
    dt = F.softplus(mixer.dt_proj.bias)  # the initial step sizes, log-uniform in [1e-3, 0.1]
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert dt.log().std() > 0.5 * (math.log(100) / math.sqrt(12))  # spread over the log range


def mamba_float64(mixer: MambaMixer, hidden: torch.Tensor) -> torch.Tensor:
    """The Mamba block written out step by step in float64 (Gu & Dao 2023, Algorithm 2)."""
    p = {k: v.detach().double() for k, v in mixer.state_dict().items()}
    h = hidden.double()
    b, length, _ = h.shape
    d_inner, n = p["A_log"].shape
    rank = p["dt_proj.weight"].shape[1]
    xz = h @ p["in_proj.weight"].T
    x, z = xz[..., :d_inner], xz[..., d_inner:]                              # (B, L, d_inner)
    w = p["conv1d.weight"][:, 0]                                             # (d_inner, d_conv)
    k = w.shape[1]
    padded = torch.cat([x.new_zeros(b, k - 1, d_inner), x], dim=1)
    x = sum(padded[:, j:j + length] * w[:, j] for j in range(k)) + p["conv1d.bias"]   # causal conv
    x = x * torch.sigmoid(x)
    dbc = x @ p["x_proj.weight"].T
    dt = F.softplus(dbc[..., :rank] @ p["dt_proj.weight"].T + p["dt_proj.bias"])       # (B, L, d_inner)
    bm, cm = dbc[..., rank:rank + n], dbc[..., rank + n:]                              # (B, L, n)
    a = -torch.exp(p["A_log"])
    state = h.new_zeros(b, d_inner, n)
    ys = []
    for t in range(length):
        state = torch.exp(dt[:, t, :, None] * a) * state + (dt[:, t] * x[:, t])[..., None] * bm[:, t, None, :]
        ys.append((state * cm[:, t, None, :]).sum(-1) + p["D"] * x[:, t])
    y = torch.stack(ys, dim=1) * (z * torch.sigmoid(z))
    return y @ p["out_proj.weight"].T


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_forward_matches_float64_mamba(backend):
    torch.manual_seed(1)
    mixer = MambaMixer(32, d_state=8, d_conv=4, expand=2, backend=backend)
    with torch.no_grad():  # larger steps than the init, so that the recurrence matters over the sequence
        mixer.dt_proj.bias.uniform_(-1, 1)
    hidden = torch.randn(2, 50, 32)
    with torch.no_grad():
        out = mixer(hidden)
    ref = mamba_float64(mixer, hidden)
    assert out.shape == (2, 50, 32)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_mixer_is_causal_and_differentiable():
    torch.manual_seed(2)
    mixer = MambaMixer(16, backend="torch")
    hidden = torch.randn(1, 20, 16, requires_grad=True)
    mixer(hidden)[0, 9].sum().backward()
    assert hidden.grad[0, 10:].abs().max() == 0          # no step sees the future
    assert hidden.grad[0, :10].abs().sum(-1).gt(0).all()  # every past step matters
    assert all(p.grad is not None and p.grad.any() for p in mixer.parameters())
