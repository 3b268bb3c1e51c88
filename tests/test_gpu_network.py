"""bench/gpu_network.py, the whole-network GPU call, end to end on this CPU in its quick mode."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("open_clip")  # the cases run with the (tiny, random-weight) DA-CLIP prior
ROOT = Path(__file__).parents[1]


def test_quick_mode_writes_every_table(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cases = "ref-eager,ours-eager,profile,components,train-ours"
    # The script's case limits are a GPU's seconds; here each case has a hang guard instead, far above
    # the ~20 s a case takes on a quiet 2-core CPU, so a busy machine only makes it slower.
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_network.py"), "--out", str(tmp_path),
                           "--quick", "--cases", cases, "--case-limit-s", "900", "--budget-s", "4500"],
                          capture_output=True, text=True, timeout=4800, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "network.json").read_text())
    got = report["cases"]
    assert list(got) == cases.split(",")
    # Same weights, inputs and dtype (fp32 on a CPU): ours matches the reference's output.
    assert got["ref-eager"]["rel_err_vs_ref"] == 0
    assert got["ours-eager"]["rel_err_vs_ref"] < 1e-5
    assert all(t > 0 for t in got["ours-eager"]["times_ms"] + got["train-ours"]["times_ms"])
    assert got["train-ours"]["batch"] == 2 and got["train-ours"]["crop"] == 16
    names = {row["name"] for row in got["profile"]["top"]}
    assert "m2restore_kernels::moe_mlp" in names and got["profile"]["launches"] > 0
    # Every component has a measured time; the table prints them beside the bounds.
    assert {"DDER 1", "refinement", "glue (pad, concat, reshapes)"} <= set(got["components"]["component_ms"])
    assert "measured µs" in got["components"]["table"]
    md = (tmp_path / "network.md").read_text()
    assert "| ours-eager | forward, ours, eager | ok |" in md and "| name | µs | launches | share |" in md
    assert "| DDER 1 |" in md
    assert {"torch", "triton", "commit", "date"} <= set(report["machine"])


def test_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")]).returncode == 0
