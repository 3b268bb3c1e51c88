"""Turn pytest-benchmark JSON from ``bench/`` into the target tables of ``bench/RESULTS.md``.

    python bench/report.py BENCH.json [MORE.json ...]

Prints Markdown: the yardsticks (copy bandwidth, GEMM peaks), then per kernel group each variant's
median with its speed-up over the baseline of the group (the authors'-style dispatcher for ``moe``,
the sequential reference for ``scan``, the eager module for ``gated_fusion``) and, where the file
also holds the yardsticks of the same machine, its ratio to the roofline floor
``max(min_mb / copy bandwidth, gflop / GEMM peak)`` (1.0 would be the floor itself).
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

BASELINES = {"moe": "authors", "scan": "reference", "gated_fusion": "eager"}


def load(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        data = json.loads(path.read_text())
        for b in data["benchmarks"]:
            rows.append(dict(name=b["name"], group=b.get("group") or "", median_s=b["stats"]["median"],
                             rounds=b["stats"]["rounds"], extra=b.get("extra_info", {})))
    return rows


def yardsticks(rows: list[dict]) -> dict:
    out = {}
    for r in rows:
        if r["name"].startswith("test_copy_bandwidth"):
            out["gbps"] = r["extra"].get("gbps")
        m = re.match(r"test_matmul_peak\[(\w+)\]", r["name"])
        if m:
            out[f"tflops_{m.group(1)}"] = r["extra"].get("tflops")
    return out


def variant(row: dict) -> tuple[str, str]:
    """(kernel family, variant) of a benchmark row, read off its test name."""
    params = re.search(r"\[(.*)\]", row["name"])
    parts = params.group(1).split("-") if params else []
    if row["name"].startswith("test_moe_dispatch"):
        return "moe", parts[2]
    if row["name"].startswith("test_bench_selective_scan"):
        return "scan", parts[1]
    if row["name"].startswith("test_gated_fusion"):
        return "gated_fusion", next((p for p in parts if p in ("eager", "compile", "torch", "triton", "copy")), "?")
    return "", ""


def floor_ms(row: dict, sticks: dict) -> float | None:
    extra, gbps = row["extra"], sticks.get("gbps")
    if not gbps or "min_mb" not in extra:
        return None
    floor = extra["min_mb"] * 2**20 / (gbps * 1e9)
    dtype = "bf16" if re.search(r"bf16", row["name"]) else "fp32"
    peak = sticks.get(f"tflops_{dtype}")
    if peak and "gflop" in extra:
        floor = max(floor, extra["gflop"] * 1e9 / (peak * 1e12))
    return floor * 1e3


def report(rows: list[dict]) -> str:
    sticks = yardsticks(rows)
    lines = []
    if sticks:
        lines += ["| yardstick | value |", "|---|---|"]
        if sticks.get("gbps"):
            lines.append(f"| copy bandwidth (read + write) | {sticks['gbps']:.0f} GB/s |")
        for dtype in ("fp32", "bf16"):
            if sticks.get(f"tflops_{dtype}"):
                lines.append(f"| {dtype} GEMM peak | {sticks[f'tflops_{dtype}']:.1f} TFLOP/s |")
        lines.append("")
    groups = defaultdict(list)
    for r in rows:
        family, name = variant(r)
        if family:
            groups[(family, r["group"])].append((name, r))
    for (family, group), members in groups.items():
        base = next((r["median_s"] for name, r in members if name == BASELINES[family]), None)
        lines += [f"**{group}**", "", "| variant | median ms | rounds | speed-up vs "
                  f"{BASELINES[family]} | / roofline floor |", "|---|---|---|---|---|"]
        for name, r in sorted(members, key=lambda m: m[1]["median_s"]):
            ms = r["median_s"] * 1e3
            speedup = f"{base / r['median_s']:.2f}x" if base else "-"
            floor = floor_ms(r, sticks)
            ratio = f"{ms / floor:.1f}" if floor else "-"
            label = r["name"][r["name"].find("[") + 1:-1] if "[" in r["name"] else name
            lines.append(f"| {label} | {ms:.3f} | {r['rounds']} | {speedup} | {ratio} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark --benchmark-json files")
    print(report(load(parser.parse_args(argv).json)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
