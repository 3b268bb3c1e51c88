"""``--dtype auto`` on every kind of CPU: the rule (native bf16 and a network wide enough for it to
pay), the ``M2RESTORE_NATIVE_BF16`` override, and the commands that resolve ``auto`` run under each
branch forced on this machine, whichever it is (AVX2, AVX512-BF16, AMX).

The forced bf16 branch runs the tiny network in bf16 (CPU autocast, slow on an AVX2 CPU), so its
images are a few dozen pixels."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from m2restore import M2Restore, M2RestoreConfig, NullPrior, precision
from m2restore.cli import main
from m2restore.options import CPU_BF16_MIN_DIM
from m2restore.precision import NATIVE_BF16_ENV, native_bf16, resolve_precision

AVX2 = dict(capability="AVX2", flags={"avx2", "fma"})  # e.g. AMD EPYC Zen 2/3
AVX512_BF16 = dict(capability="AVX512", flags={"avx512f", "avx512_bf16"})  # Intel Cooper Lake, AMD Zen 4
AMX = dict(capability="AVX512", flags={"avx512_bf16", "amx_bf16", "amx_tile"})  # Intel Sapphire Rapids


@pytest.mark.parametrize("machine, config, expected", [
    (AVX2, M2RestoreConfig.paper(), "fp32"),
    (AVX2, M2RestoreConfig.tiny(), "fp32"),
    (AVX512_BF16, M2RestoreConfig.paper(), "bf16"),  # dim 48: measured 1.4× faster in bf16
    (AVX512_BF16, M2RestoreConfig.tiny(), "fp32"),  # dim 8: measured no gain
    (AMX, M2RestoreConfig.paper(), "bf16"),
    (AMX, M2RestoreConfig.tiny(), "fp32"),
    (AMX, M2RestoreConfig.tiny(dim=CPU_BF16_MIN_DIM), "bf16"),  # the threshold itself is wide enough
    (AMX, M2RestoreConfig.tiny(dim=CPU_BF16_MIN_DIM - 8), "fp32"),
    (AMX, None, "bf16"),  # no network known: the CPU alone decides
    (AVX2, None, "fp32"),
])
def test_auto_on_a_cpu_takes_bf16_only_where_native_and_the_network_is_wide(machine, config, expected):
    chosen, why = resolve_precision("auto", "cpu", config, **machine)
    assert chosen == expected
    if native_bf16("cpu", **machine)[0] and expected == "fp32":
        assert f"{config.dim} channels wide" in why and str(CPU_BF16_MIN_DIM) in why


def test_auto_on_a_gpu_ignores_the_width():
    assert resolve_precision("auto", "cuda", M2RestoreConfig.tiny(), cuda_capability=(8, 0))[0] == "bf16"
    assert resolve_precision("auto", "cuda", M2RestoreConfig.paper(), cuda_capability=(7, 5))[0] == "fp32"


@pytest.mark.parametrize("value, native", [("1", True), ("0", False), ("", None)])
def test_the_environment_overrides_the_cpu_probe(monkeypatch, value, native):
    monkeypatch.setenv(NATIVE_BF16_ENV, value)
    # What the machine has must not matter (empty: unset, so the flags decide).
    for flags, has in (({"avx2"}, False), ({"avx512_bf16", "amx_bf16"}, True)):
        monkeypatch.setattr(precision, "cpu_flags", lambda flags=flags: frozenset(flags))
        got, why = native_bf16("cpu")
        assert got == (has if native is None else native)
        assert (f"{NATIVE_BF16_ENV}={value}" in why) == (native is not None)
    # Flags passed in explicitly (the decision table) are not overridden.
    assert native_bf16("cpu", **AVX2)[0] is False


def test_a_bad_override_names_the_variable(monkeypatch):
    monkeypatch.setenv(NATIVE_BF16_ENV, "yes")
    with pytest.raises(ValueError, match=f"{NATIVE_BF16_ENV}='yes': set it to 1 .* 0 .* or unset it"):
        resolve_precision("auto", "cpu")


@pytest.fixture(params=["bf16", "fp32"])
def auto_branch(request, monkeypatch):
    """Forces what ``--dtype auto`` resolves to on this CPU: the environment override (which
    subprocesses inherit), and for bf16 also a width threshold of 0 so that the tiny networks these
    tests run stand in for a wide one (in this process only)."""
    monkeypatch.setenv(NATIVE_BF16_ENV, "1" if request.param == "bf16" else "0")
    if request.param == "bf16":
        monkeypatch.setattr(precision, "CPU_BF16_MIN_DIM", 0)
    assert resolve_precision("auto", "cpu", M2RestoreConfig.tiny())[0] == request.param
    return request.param


@pytest.fixture
def command_args(request, tmp_path):
    """The arguments of ``eval`` or ``restore`` on small random images and a tiny network (``routing``
    resolves ``auto`` in the same function as ``eval``, :func:`m2restore.cli.common.load_model_from_args`)."""
    torch.manual_seed(0)
    cfg = M2RestoreConfig.tiny(backend="torch")
    M2Restore(cfg, prior=NullPrior(cfg.num_degradations, cfg.prior_dim)).save_pretrained(tmp_path / "w")
    rng = np.random.default_rng(0)
    for folder in ("input", "gt"):
        (tmp_path / "set" / folder).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (8, 16, 3), dtype=np.uint8)).save(tmp_path / "set" / folder / f"{i}.png")
    common = ["--weights", str(tmp_path / "w"), "--device", "cpu"]
    return {
        "eval": ["eval", "--data", f"s={tmp_path / 'set'}", "--out", str(tmp_path / "o"), *common],
        "restore": ["restore", str(tmp_path / "set" / "input"), "-o", str(tmp_path / "o"), "--quiet", *common],
    }[request.param]


@pytest.mark.filterwarnings("ignore:M2Restore has no degradation prior")
@pytest.mark.parametrize("command_args", ["eval", "restore"], indirect=True)
def test_commands_run_the_network_at_the_precision_auto_picked(auto_branch, command_args, monkeypatch, capsys):
    """The command says what auto chose and runs the network under autocast to exactly that. (The
    autocast is recorded, then run as fp32: the bf16 results themselves are tested with --dtype bf16
    in test_evaluate.py and test_restore.py, and bf16 is slow on an AVX2 CPU.)"""
    from m2restore import restore

    used = []
    monkeypatch.setattr(restore, "autocast", lambda device, name: used.append(name) or contextlib.nullcontext())
    assert main(["-v", *command_args]) == 0
    assert f"--dtype auto chose {auto_branch} on cpu" in capsys.readouterr().err
    assert used and set(used) == {auto_branch}


def test_bench_default_plan_follows_the_forced_branch(auto_branch):
    import argparse

    from m2restore.cli.bench import add_arguments, cases_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cases = cases_from_args(parser.parse_args(["--config", "paper"]), torch.device("cpu"))
    expected = ["fp32", "bf16"] if auto_branch == "bf16" else ["fp32"]
    assert [(c.backend, c.dtype) for c in cases] == [(b, d) for d in expected for b in ("reference", "torch")]


def test_a_subprocess_reads_the_override_and_keeps_the_narrow_demo_in_fp32(tmp_path):
    """As a user (or CI) sets it: the command resolves auto with the override, and the shipped demo
    network (dim 8) runs in fp32 even on a CPU with native bf16."""
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    env = {**os.environ, NATIVE_BF16_ENV: "1"}
    proc = subprocess.run([sys.executable, "-m", "m2restore", "-v", "restore", str(tmp_path / "x.png"), "-o",
                           str(tmp_path / "out"), "--device", "cpu"], capture_output=True, text=True, env=env,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stderr.splitlines() if "--dtype auto chose" in line)
    assert line.startswith("m2restore: --dtype auto chose fp32 on cpu: ") and f"{NATIVE_BF16_ENV}=1" in line
    assert "8 channels wide" in line
