"""``--max-memory`` bounds the peak resident memory of ``m2restore restore`` above the process
baseline (docs/design.md#tiling): a tiled run's peak RSS, measured on the child process
(``ru_maxrss`` through ``wait4``), stays within the budget plus the peak of the same command on a
tiny image (the baseline: Python, torch and its libraries, the model, the fixed costs)."""
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from m2restore.restore import DEMO_WEIGHTS, load_model, plan_restore, weight_bytes

BUDGET = 256 << 20


def _peak_rss(*args) -> tuple[int, str]:
    """(peak RSS in bytes, stderr) of ``python -m m2restore -v restore ARGS`` on the CPU in fp32."""
    cmd = [sys.executable, "-m", "m2restore", "-v", "restore", *map(str, args), "--device", "cpu", "--dtype", "fp32"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, stderr
    return usage.ru_maxrss * 1024, stderr


def _photo(path, h, w, seed):
    """A smooth random field with noise: something for the network to do, compressible as PNG."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((h // 32 + 2, w // 32 + 2, 3))
    field = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float64)
    noisy = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(path)


def test_tiled_peak_rss_stays_within_the_budget_above_the_baseline(tmp_path):
    h, w = 900, 1200
    _photo(tmp_path / "big.png", h, w, 0)
    _photo(tmp_path / "tiny.png", 48, 64, 1)
    model = load_model(DEMO_WEIGHTS)
    # Gathering passes off: the same buffers, a third of the forwards (the test stays short).
    plan = plan_restore(model.config, h, w, BUDGET, weight_bytes(model), stat_passes=0)
    assert 0 < plan.tile < 900 and plan.memory.total <= BUDGET
    baseline, _ = _peak_rss(tmp_path / "tiny.png", "-o", tmp_path / "a", "--quiet")
    peak, stderr = _peak_rss(tmp_path / "big.png", "-o", tmp_path / "b", "--quiet", "--max-memory", str(BUDGET),
                             "--stat-passes", "0")
    assert f"{plan.tile}-pixel tiles" in stderr
    assert peak <= baseline + BUDGET, (f"peak RSS {peak / 2**20:.0f} MiB over the baseline {baseline / 2**20:.0f} "
                                       f"MiB + --max-memory {BUDGET >> 20} MiB")
