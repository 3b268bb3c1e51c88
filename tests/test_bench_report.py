"""bench/report.py on hand-made numbers (speed-ups, roofline ratios), and bench/profile_model.py runs."""
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


def test_profile_script_names_the_heaviest_operators(capsys):
    path = Path(__file__).parents[1] / "bench" / "profile_model.py"
    spec = importlib.util.spec_from_file_location("profile_model", path)
    profile_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile_model)
    assert profile_model.main(["--config", "tiny", "--size", "32", "--dtype", "fp32", "--no-prior",
                               "--steps", "1", "--rows", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny() torch fp32 32px, prior off, 1 forwards on CPU")
    assert "aten::" in out  # an operator table follows
