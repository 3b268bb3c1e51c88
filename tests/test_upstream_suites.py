"""causal-conv1d's own test file, unchanged, through ``m2restore_kernels.apply_to_mamba_ssm()`` on this
machine's CPU (``bench/upstream_cpu.py`` moves the tensors its tests create with ``device="cuda"``).

causal-conv1d ships ``tests/test_causal_conv1d.py`` in its sdist; ``.ci/run`` unpacks it from the
registry's into ``.upstream/`` (``M2RESTORE_UPSTREAM_TESTS`` names another folder). mamba-ssm's
op tests are not in its sdists: ``bench/run_upstream_suites.sh`` runs them, and this whole file,
from git checkouts (counts in bench/RESULTS.md). Here a spread-out sample (``--every``) of its
13,373 cases runs in a child process, as a user's would: no Triton interpreter, our C loops.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM = Path(os.environ.get("M2RESTORE_UPSTREAM_TESTS", ROOT / ".upstream"))
CAUSAL_CONV1D_TESTS = UPSTREAM / "test_causal_conv1d.py"
EVERY = {True: 25, False: 5}  # --quick: about 540 cases, else about 2,700


@pytest.mark.skipif(not CAUSAL_CONV1D_TESTS.is_file(),
                    reason=f"causal-conv1d's test file is not at {CAUSAL_CONV1D_TESTS} (.ci/run unpacks it from the sdist)")
@pytest.mark.skipif(importlib.util.find_spec("causal_conv1d") is None,
                    reason="causal-conv1d not installed (.ci/run installs it without its CUDA build)")
def test_causal_conv1d_suite_passes_through_the_one_call(quick, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a user's process
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "bench"), str(ROOT), str(ROOT / "kernels"),
                                         env.get("PYTHONPATH", "")])
    # Run from a folder of its own: our conftest (the interpreter) and pytest settings stay out.
    # test_causal_conv1d_race_condition repeats a 2x4128x2048 forward + backward 10,000 times to catch
    # a CUDA race: hours on a CPU, where the conv (PyTorch ops) has no atomics to race.
    cmd = [sys.executable, "-m", "pytest", "-p", "upstream_cpu", "-p", "no:cacheprovider", "-q", "-rfE",
           "--tb=line", "-W", "ignore::DeprecationWarning", "-k", "not race_condition", f"--every={EVERY[quick]}", str(CAUSAL_CONV1D_TESTS)]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", summary)}
    assert run.returncode == 0 and counts.get("passed", 0) > 100 and not counts.get("failed"), \
        f"{summary}\n{run.stdout[-4000:]}"
    print(f"causal-conv1d's tests/test_causal_conv1d.py (every {EVERY[quick]}th case): {summary}")
