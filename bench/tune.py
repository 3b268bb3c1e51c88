"""Time alternative launch configurations of the Triton kernels on this GPU.

The package launches its kernels with fixed configurations chosen by rule (``default_config`` of
``m2restore_kernels.tuning.moe`` and ``.selective_scan``; their register and spill counts checked by
``bench/compile_check.py``), not autotuned: autotuning would compile every candidate in the user's
first call and needs a GPU to decide. This script produces the data to choose those rules from:
at M2Restore's shapes it runs a grid of alternatives, checks that each gives the default
configuration's result, and prints them fastest first (and, with ``--json``, writes them out).

    python bench/tune.py moe  [--size 512] [--dtype bf16] [--full] [--json PATH]   # expert kernels, 3 DDERs
    python bench/tune.py scan [--size 512] [--dtype bf16] [--full] [--json PATH]   # the Mamba branch's scan

The default grids hold 12 configurations per kernel and shape, each compiled on first use;
``--full`` times 48 (MoE) and 45 (scan).

Times are medians from ``triton.testing.do_bench`` (forward, and backward given the forward's
saved tensors). A configuration that fails to compile or launch (shared memory, registers) is
listed with its error. Without CUDA, ``--quick`` runs tiny shapes through the interpreter
(``TRITON_INTERPRET=1``): a check that the script works, not a timing.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from dataclasses import asdict, replace
from typing import Callable, Iterator

import torch

from m2restore_kernels import topk_softmax_ref
from m2restore_kernels.tuning import moe, selective_scan as scan

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
N_EXPERTS, TOP_K = 6, 2


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def run_grid(label: str, candidates: list, default, run: Callable, tol: float, device: torch.device) -> list[dict]:
    """Time ``run(cfg)`` (-> tensor) for the default and every candidate; check each against the default."""
    reference = run(default)
    rows = []
    for cfg in [default, *[c for c in candidates if c != default]]:
        row = dict(case=label, config=asdict(cfg), default=cfg == default)
        try:
            err = rel_err(run(cfg), reference)
            row.update(ms=time_ms(lambda: run(cfg), device), rel_err=err,
                       status="ok" if err <= tol else f"MISMATCH (rel err {err:.1e})")
        except Exception as exc:  # compile and launch errors differ between Triton versions
            row.update(ms=None, status="failed: " + (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:120])
        rows.append(row)
    base = rows[0]["ms"]
    for row in rows:
        row["vs_default"] = row["ms"] / base if row["ms"] and base else None
    return rows


def _tol(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 2e-2


def moe_cases(size: int, dtype: torch.dtype, device: torch.device, quick: bool, full: bool) -> Iterator[list[dict]]:
    shapes = [(256, 16, 42)] if quick else [((size >> lvl) ** 2, 48 << lvl, int(2.66 * (48 << lvl)))
                                             for lvl in range(3)]
    for P, C, Hd in shapes:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(P, C, generator=g).to(device, dtype)
        weights, indices = topk_softmax_ref(torch.randn(P, N_EXPERTS, generator=g), TOP_K)
        weights, indices = weights.to(device), indices.to(device)
        w1 = (torch.randn(N_EXPERTS, C, Hd, generator=g) / C ** 0.5).to(device, dtype)
        b1 = (0.1 * torch.randn(N_EXPERTS, Hd, generator=g)).to(device, dtype)
        w2 = (torch.randn(N_EXPERTS, Hd, C, generator=g) / Hd ** 0.5).to(device, dtype)
        b2 = (0.1 * torch.randn(N_EXPERTS, C, generator=g)).to(device, dtype)
        args = (x, weights, indices, w1, b1, w2, b2, "logsumexp", dtype)
        label = f"moe P={P} C={C} hidden={Hd} {str(dtype)[6:]}"
        fwd_default = moe.default_config(TOP_K * P, N_EXPERTS, C, Hd, device, dtype)
        bwd_default = moe.default_config(TOP_K * P, N_EXPERTS, C, Hd, device, dtype, backward=True)
        axes = ((16, 32, 64, 128), (16, 32, 64), (4, 8), (2, 3)) if full else ((32, 64, 128), (32, 64), (4, 8), (2,))
        grid = ([replace(fwd_default, block_m=32)] if quick else
                [replace(fwd_default, block_m=m, block_h=h, num_warps=w, num_stages=s)
                 for m, h, w, s in itertools.product(*axes) if h <= moe.pow2_at_least(Hd, moe.MIN_DOT)])
        yield run_grid(label + " fwd", grid, fwd_default, lambda cfg: moe.moe_mlp_fwd(*args, config=cfg)[0],
                       _tol(dtype), device)
        _, out, order, offsets = moe.moe_mlp_fwd(*args)
        dy = torch.randn(P, C, generator=g).to(device, dtype)
        bwd_grid = [replace(cfg, dw_split=bwd_default.dw_split) for cfg in grid]
        yield run_grid(label + " bwd", bwd_grid, bwd_default,
                       lambda cfg: moe.moe_mlp_bwd(dy, x, weights, order, offsets, w1, b1, w2, out, "logsumexp",
                                                   config=cfg)[0], _tol(dtype), device)


def scan_cases(size: int, dtype: torch.dtype, device: torch.device, quick: bool, full: bool) -> Iterator[list[dict]]:
    d, l, n = (8, 40, 4) if quick else (768, (size // 8) ** 2, 16)
    g = torch.Generator().manual_seed(0)
    u, delta, z = (torch.randn(1, d, l, generator=g).to(device, dtype) for _ in range(3))
    A = -torch.rand(d, n, generator=g).add(0.5).to(device)
    B, C = (torch.randn(1, n, l, generator=g).to(device, dtype) for _ in range(2))
    D, bias = torch.randn(d, generator=g).to(device), torch.randn(d, generator=g).to(device)
    args = (u, delta, A, B, C, D, z, bias, True)
    default = scan.config_for(u, B, C, n)
    label = f"scan d={d} L={l} n={n} {str(dtype)[6:]}"
    axes = ((1, 2, 4, 8, 16), (16, 32, 64), (2, 4, 8)) if full else ((2, 4, 8), (32, 64), (4, 8))
    grid = ([replace(default, block_d=max(1, default.block_d // 2))] if quick else
            [replace(default, block_d=bd, chunk=ck, fwd_warps=w, bwd_warps=w) for bd, ck, w in itertools.product(*axes)])
    yield run_grid(label + " fwd", grid, default, lambda cfg: scan.selective_scan_fwd(*args, config=cfg)[0],
                   _tol(dtype), device)
    dout = torch.randn(1, d, l, generator=g).to(device, dtype)
    saved = {}

    def backward(cfg):
        if cfg.chunk not in saved:  # the checkpoints' spacing is the chunk
            saved[cfg.chunk] = scan.selective_scan_fwd(*args, config=cfg)[2]
        return scan.selective_scan_bwd(dout, None, u, delta, A, B, C, D, z, bias, saved[cfg.chunk], True,
                                       config=cfg)[0]

    yield run_grid(label + " bwd", grid, default, backward, _tol(dtype), device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("op", choices=("moe", "scan"))
    parser.add_argument("--size", type=int, default=512, help="image side whose shapes to time (default 512)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, two configurations (a smoke check)")
    parser.add_argument("--full", action="store_true", help="the larger grids")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.quick:
        parser.error("timing needs CUDA; without it only --quick (the interpreter) runs")
    cases = (moe_cases if args.op == "moe" else scan_cases)(args.size, DTYPES[args.dtype], device, args.quick,
                                                            args.full)
    rows = []
    for case in cases:  # each case printed and saved as it completes: a time limit loses only the rest
        print(f"\n{case[0]['case']}", flush=True)
        for r in sorted(case, key=lambda r: (r["ms"] is None, r["ms"] or 0)):
            cfg = " ".join(f"{k}={v}" for k, v in r["config"].items())
            ms = f"{r['ms']:9.4f} ms {r['vs_default']:5.2f}x" if r["ms"] is not None else " " * 21
            print(f"  {ms}  {cfg}{'  (default)' if r['default'] else ''}  {r['status']}", flush=True)
        rows += case
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    return sum(not r["status"].startswith(("ok", "failed")) for r in rows)  # mismatches only


if __name__ == "__main__":
    raise SystemExit(main())
