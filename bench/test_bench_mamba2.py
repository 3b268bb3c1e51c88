"""mamba-ssm's ``Mamba2`` block on the CPU (group ``mamba2 block <L> <pass>``): through
``apply_to_mamba_ssm()`` (``ours``: the SSD as our selective scan's C loop) against transformers'
``Mamba2Mixer`` with the same weights on its own PyTorch path (``transformers``: the chunked SSD
in PyTorch ops, what it runs without hub kernels; mamba-ssm itself has no CPU path for Mamba-2).

Block: d_model 256, d_state 64, headdim 64, expand 2 (8 heads), 1 group, chunk 256, batch 1;
L = 1024 and 4096, forward and forward + backward. Each case first checks that both give the same
output. ``--quick`` shrinks every size so CI only checks that the group runs. Skips without
mamba-ssm or transformers.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from m2restore_kernels._backend import DISABLE_ENV
from m2restore_kernels.integrations.mamba_ssm import apply_to_mamba_ssm

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("mamba_ssm", "causal_conv1d", "transformers")),
    reason="mamba-ssm / causal-conv1d (.ci/run installs them) or transformers not installed")
BLOCK = dict(d_model=256, d_state=64, headdim=64, chunk_size=256, lengths=(1024, 4096))
QUICK_BLOCK = dict(d_model=32, d_state=8, headdim=8, chunk_size=16, lengths=(32, 64))


@pytest.fixture(autouse=True)
def cpu_user(monkeypatch):
    """On CPU, ``ours`` is what a user's process runs: the C loop, not the root conftest's Triton
    interpreter."""
    if not torch.cuda.is_available():
        monkeypatch.setenv(DISABLE_ENV, "triton")


def blocks(cfg):
    """(ours, transformers') with the same weights."""
    apply_to_mamba_ssm()
    import transformers
    from mamba_ssm.modules.mamba2 import Mamba2

    torch.manual_seed(0)
    ours = Mamba2(d_model=cfg["d_model"], d_state=cfg["d_state"], headdim=cfg["headdim"], chunk_size=cfg["chunk_size"])
    config = transformers.Mamba2Config(hidden_size=cfg["d_model"], state_size=cfg["d_state"], head_dim=cfg["headdim"],
                                       num_heads=ours.nheads, n_groups=1, expand=2, conv_kernel=4,
                                       chunk_size=cfg["chunk_size"], use_bias=False, use_conv_bias=True,
                                       layer_norm_epsilon=ours.norm.eps, num_hidden_layers=1)
    theirs = transformers.models.mamba2.modeling_mamba2.Mamba2Mixer(config, layer_idx=0)
    theirs.load_state_dict(ours.state_dict())
    return {"ours": ours, "transformers": theirs}


@pytest.mark.parametrize("impl", ["ours", "transformers"])
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("size", [0, 1], ids=["L1k", "L4k"])
def test_mamba2_block(bench, benchmark, quick, size, pass_, impl):
    cfg = QUICK_BLOCK if quick else BLOCK
    length = cfg["lengths"][size]
    benchmark.group = f"mamba2 block L={length} {pass_}"
    models = blocks(cfg)
    x = torch.randn(1, length, cfg["d_model"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(models["ours"](x), models["transformers"](x), rtol=1e-3, atol=1e-4)
    model, x = models[impl], x.requires_grad_(pass_ == "fwd+bwd")

    def run():
        if pass_ == "fwd":
            with torch.no_grad():
                return model(x)
        model(x).sum().backward()

    bench(run, 3)
