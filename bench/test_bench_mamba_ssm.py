"""mamba-ssm's own models on the CPU (groups ``mamba_ssm <what>``): through ``apply_to_mamba_ssm()``
(``ours``), mamba-ssm's PyTorch reference path (``reference``: ``mamba_ssm_reference_path``, what a
machine without its kernels runs) and mambapy (``mambapy``: a pure-PyTorch Mamba with a parallel
scan, same sizes, its own weights).

Rows: the ``Mamba`` block (d_model 256, d_state 16, batch 1) forward and forward + backward at
L = 1024 and 4096; a ``MambaLMHeadModel`` (4 layers, d_model 256, vocabulary 1024, L = 512) forward
+ backward; generation tokens/s (prompt 64, 64 new tokens, greedy). Variants of a row run one after
another in the same process. ``--quick`` shrinks every size so CI only checks that the group runs.
Skips without mamba-ssm (mambapy rows skip without mambapy).
"""
from __future__ import annotations

import contextlib
import importlib.util

import pytest
import torch

from m2restore_kernels._backend import DISABLE_ENV
from m2restore_kernels.integrations.mamba_ssm import apply_to_mamba_ssm, mamba_ssm_reference_path

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is None
                                or importlib.util.find_spec("causal_conv1d") is None,
                                reason="mamba-ssm / causal-conv1d not installed (.ci/run installs them)")
IMPLS = ("ours", "reference", "mambapy")
BLOCK = {"d_model": 256, "lengths": (1024, 4096)}
QUICK_BLOCK = {"d_model": 32, "lengths": (64, 128)}
LM = {"d_model": 256, "n_layer": 4, "vocab": 1024, "length": 512, "prompt": 64, "new": 64}
QUICK_LM = {"d_model": 32, "n_layer": 2, "vocab": 64, "length": 32, "prompt": 8, "new": 4}


@pytest.fixture(autouse=True)
def cpu_user(monkeypatch):
    """On CPU, ``ours`` is what a user's process runs: the C loop (the root conftest's Triton
    interpreter is for tests and says nothing about speed)."""
    if not torch.cuda.is_available():
        monkeypatch.setenv(DISABLE_ENV, "triton")


def rounds(impl):
    return 1 if impl == "reference" else 3  # the reference path's sequential scan: seconds a call


def need(impl):
    if impl == "mambapy" and importlib.util.find_spec("mambapy") is None:
        pytest.skip("mambapy not installed")
    apply_to_mamba_ssm()


def path(impl, model):
    return mamba_ssm_reference_path(model) if impl == "reference" else contextlib.nullcontext()


def mambapy_config(d_model, n_layers):
    from mambapy.mamba import MambaConfig

    return MambaConfig(d_model=d_model, n_layers=n_layers, d_state=16, expand_factor=2, d_conv=4, pscan=True)


def block(impl, d_model):
    torch.manual_seed(0)
    if impl == "mambapy":
        from mambapy.mamba import MambaBlock

        return MambaBlock(mambapy_config(d_model, 1))
    from mamba_ssm.modules.mamba_simple import Mamba

    return Mamba(d_model=d_model, d_state=16, layer_idx=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("size", [0, 1], ids=["L1k", "L4k"])
def test_mamba_block(bench, benchmark, quick, size, pass_, impl):
    need(impl)
    cfg = QUICK_BLOCK if quick else BLOCK
    length = cfg["lengths"][size]
    benchmark.group = f"mamba_ssm block L={length} {pass_}"
    model = block(impl, cfg["d_model"])
    x = torch.randn(1, length, cfg["d_model"], requires_grad=pass_ == "fwd+bwd")

    def run():
        with path(impl, model):
            if pass_ == "fwd":
                with torch.no_grad():
                    return model(x)
            model(x).sum().backward()

    bench(run, rounds(impl))


def lm(impl, cfg):
    torch.manual_seed(0)
    if impl == "mambapy":
        from mambapy.lm import LM

        return LM(mambapy_config(cfg["d_model"], cfg["n_layer"]), vocab_size=cfg["vocab"])
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    config = MambaConfig(d_model=cfg["d_model"], n_layer=cfg["n_layer"], vocab_size=cfg["vocab"],
                         ssm_cfg={}, pad_vocab_size_multiple=8)
    return MambaLMHeadModel(config)


@pytest.mark.parametrize("impl", IMPLS)
def test_lm_forward_backward(bench, benchmark, quick, impl):
    need(impl)
    cfg = QUICK_LM if quick else LM
    benchmark.group = f"mamba_ssm MambaLMHeadModel L={cfg['length']} fwd+bwd"
    model = lm(impl, cfg)
    ids = torch.randint(0, cfg["vocab"], (1, cfg["length"]))

    def run():
        with path(impl, model):
            out = model(ids)
            (out.logits if hasattr(out, "logits") else out).float().logsumexp(-1).sum().backward()

    bench(run, rounds(impl))


def mambapy_greedy(model, ids, new):
    """mambapy's decode loop (its LM.generate needs a tokenizer): the prompt one token at a time
    through ``step``, then ``new`` greedy tokens."""
    config = model.config
    caches = [(None, torch.zeros(ids.shape[0], config.d_inner, config.d_conv - 1)) for _ in range(config.n_layers)]
    for t in range(ids.shape[1]):
        logits, caches = model.step(ids[:, t], caches)
    out = []
    for _ in range(new):
        token = logits.argmax(-1)
        out.append(token)
        logits, caches = model.step(token, caches)
    return torch.stack(out, 1)


@pytest.mark.parametrize("impl", IMPLS)
def test_lm_generation(bench, benchmark, quick, impl):
    need(impl)
    cfg = QUICK_LM if quick else LM
    benchmark.group = f"mamba_ssm MambaLMHeadModel generate {cfg['new']} tokens (prompt {cfg['prompt']})"
    model = lm(impl, cfg).eval()
    ids = torch.randint(0, cfg["vocab"], (1, cfg["prompt"]))

    def run():
        with torch.no_grad(), path(impl, model):
            if impl == "mambapy":
                return mambapy_greedy(model, ids, cfg["new"])
            return model.generate(ids, max_length=cfg["prompt"] + cfg["new"])

    bench(run, rounds(impl))
    if benchmark.stats is not None:  # None under --benchmark-disable, and under xdist (the README's test command)
        benchmark.extra_info["tokens_per_s"] = cfg["new"] / benchmark.stats.stats.mean
