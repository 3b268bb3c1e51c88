"""Peak memory (resident set) of restoring images on a CPU, each measured in a fresh process.

Group ``memory-per-pixel``: the high-water mark of one whole-image forward pass above the RSS
before it, per padded input pixel, for ``M2RestoreConfig.tiny()`` and ``.paper()``; the constants
``BYTES_PER_PIXEL_BASE`` and ``BYTES_PER_PIXEL_PER_CHANNEL`` of :mod:`m2restore.restore` are fitted
to these numbers, and the test checks that the estimate still covers what is measured.

Group ``memory-restore``: ``m2restore restore`` with default flags (the demo weights, automatic
tiling under the default memory budget) on a 2400×1600 image, its peak RSS (``ru_maxrss`` of the
child) against the 3 GB target; ``--quick`` uses a 480×320 image and a 64M budget.

Run it as a script for one measurement: ``python bench/test_bench_memory.py paper 256 256``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

SIZES = {"tiny": [(128, 128), (256, 256), (256, 512)], "paper": [(128, 128), (256, 256)]}


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure_forward(config_name: str, h: int, w: int) -> dict:
    """Peak RSS above the RSS before one no-grad forward pass of an H×W image, in this process."""
    import warnings

    import torch

    from m2restore import M2Restore, M2RestoreConfig
    from m2restore.allocator import retain_freed_memory

    retain_freed_memory()  # as the m2restore command runs
    warnings.filterwarnings("ignore", "M2Restore has no degradation prior")
    model = M2Restore(getattr(M2RestoreConfig, config_name)(backend="torch")).eval()
    with torch.no_grad():
        model(torch.rand(1, 3, 32, 32))  # load the kernels' code before the baseline
        x = torch.rand(1, 3, h, w)
        before = _status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the high-water mark, to the current RSS
        model(x)
    return {"config": config_name, "h": h, "w": w, "peak_above_bytes": _status_bytes("VmHWM") - before}


def _peak_rss_of(cmd: list[str]) -> tuple[int, int, str]:
    """(exit status, peak RSS in bytes, output) of ``cmd``, from wait4's rusage of that child alone."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    output = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024, output  # ru_maxrss is in kB on Linux


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        quick = metafunc.config.getoption("--quick")
        cases = [("tiny", 64, 64)] if quick else [(c, h, w) for c, sizes in SIZES.items() for h, w in sizes]
        metafunc.parametrize("case", cases, ids=[f"{c}-{h}x{w}" for c, h, w in cases])


@pytest.mark.benchmark(group="memory-per-pixel")
def test_forward_peak_rss_per_pixel(benchmark, case):
    from m2restore import M2RestoreConfig
    from m2restore.restore import working_set_bytes

    config_name, h, w = case
    cmd = [sys.executable, __file__, config_name, str(h), str(w)]
    status, _, output = benchmark.pedantic(_peak_rss_of, args=(cmd,), rounds=1, iterations=1)
    assert status == 0, output
    result = json.loads(output.strip().splitlines()[-1])
    measured = result["peak_above_bytes"]
    estimate = working_set_bytes(getattr(M2RestoreConfig, config_name)(), h, w)
    benchmark.extra_info.update(result, bytes_per_pixel=measured / (h * w), estimate_bytes=estimate)
    if h * w >= 128 * 128:  # below that, allocator granularity and fixed buffers dominate
        assert measured <= estimate, f"{config_name} {h}x{w}: measured {measured} B above the estimate {estimate} B"


@pytest.mark.benchmark(group="memory-restore")
def test_restore_default_flags_peak_rss(benchmark, quick, tmp_path):
    from PIL import Image

    h, w = (320, 480) if quick else (1600, 2400)
    rng = np.random.default_rng(0)
    # A smooth photo-like image: noise would only cost PNG decoding time, not memory.
    base = rng.random((h // 16, w // 16, 3))
    Image.fromarray(np.uint8(np.kron(base, np.ones((16, 16, 1))) * 255)).save(tmp_path / "big.png")
    cmd = [sys.executable, "-m", "m2restore", "restore", str(tmp_path / "big.png"), "-o", str(tmp_path / "out"),
           "--device", "cpu", "--quiet"] + (["--max-memory", "64M"] if quick else [])
    status, peak, output = benchmark.pedantic(_peak_rss_of, args=(cmd,), rounds=1, iterations=1)
    assert status == 0, output
    assert Image.open(tmp_path / "out" / "big.png").size == (w, h)
    benchmark.extra_info.update(h=h, w=w, peak_rss_bytes=peak, peak_rss_gib=peak / 2**30)
    if not quick:
        assert peak <= 3 * 10**9, f"{w}x{h} with default flags peaked at {peak / 1e9:.2f} GB (target 3 GB)"


if __name__ == "__main__":
    print(json.dumps(measure_forward(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
