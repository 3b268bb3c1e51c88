"""bench/report.py: speed-ups and roofline ratios from pytest-benchmark JSON, on hand-made numbers."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

spec = importlib.util.spec_from_file_location("bench_report", Path(__file__).parents[1] / "bench" / "report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)


def bench_row(name, group, median_s, **extra):
    return dict(name=name, group=group, stats=dict(median=median_s, rounds=20), extra_info=extra)


def test_speedups_and_roofline_ratios(tmp_path):
    group = "moe 1000x48 hidden 127 fwd bf16"
    rows = [
        bench_row("test_copy_bandwidth", "yardstick", 1e-3, gbps=1000.0),
        bench_row("test_matmul_peak[bf16]", "yardstick", 1e-3, tflops=100.0),
        # floor: max(1000 MiB / 1000 GB/s = 1.048576 ms, 50 GFLOP / 100 TFLOP/s = 0.5 ms) = 1.048576 ms
        bench_row("test_moe_dispatch[224px-dder1-authors-fwd-bf16]", group, 8e-3, min_mb=1000.0, gflop=50.0),
        bench_row("test_moe_dispatch[224px-dder1-triton-fwd-bf16]", group, 2e-3, min_mb=1000.0, gflop=50.0),
    ]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"benchmarks": rows}))
    text = report.report(report.load([path]))
    assert "| copy bandwidth (read + write) | 1000 GB/s |" in text
    assert "| 224px-dder1-triton-fwd-bf16 | 2.000 | 20 | 4.00x | 1.9 |" in text
    assert "| 224px-dder1-authors-fwd-bf16 | 8.000 | 20 | 1.00x | 7.6 |" in text
    # fastest first within the group
    assert text.index("triton-fwd-bf16") < text.index("authors-fwd-bf16")
