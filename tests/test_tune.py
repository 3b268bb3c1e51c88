"""bench/tune.py: the launch-config sweep runs every candidate, checks it against the default
configuration's result, and reports failures and mismatches instead of timing them as wins."""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
spec = importlib.util.spec_from_file_location("tune", Path(__file__).parents[1] / "bench" / "tune.py")
tune = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tune)


@pytest.mark.parametrize("op", ["moe", "scan"])
def test_quick_sweep_runs_default_and_alternatives(op, tmp_path):
    """Tiny shapes (interpreted on a CPU): every case lists its default and one other configuration,
    both giving the default's result."""
    out = tmp_path / "rows.json"
    assert tune.main([op, "--quick", "--dtype", "fp32", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    for case in {r["case"] for r in rows}:
        mine = [r for r in rows if r["case"] == case]
        assert len(mine) == 2 and sum(r["default"] for r in mine) == 1, case
        assert all(r["status"] == "ok" and r["ms"] > 0 and r["rel_err"] <= 1e-4 for r in mine), mine


@dataclass(frozen=True)
class _Cfg:
    tile: int


def test_grid_flags_wrong_results_and_failures():
    x = torch.arange(1.0, 5.0)

    def run(cfg):
        if cfg.tile == 3:
            raise RuntimeError("out of resources: shared memory")
        return x * (1.5 if cfg.tile == 2 else 1.0)

    rows = tune.run_grid("case", [_Cfg(1), _Cfg(2), _Cfg(3)], _Cfg(1), run, 1e-4, torch.device("cpu"))
    assert [r["config"]["tile"] for r in rows] == [1, 2, 3]  # the default first, listed once
    assert rows[0]["status"] == "ok" and rows[0]["vs_default"] == 1.0
    assert rows[1]["status"].startswith("MISMATCH")
    assert rows[2]["status"] == "failed: out of resources: shared memory" and rows[2]["ms"] is None
