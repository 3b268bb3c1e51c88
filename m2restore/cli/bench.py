"""``m2restore bench``: time the whole network per backend against the paper's 0.17 s per image
(see :mod:`m2restore.benchmark`)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import torch

from ..benchmark import (CAPTURABLE, BenchSession, Case, format_table, machine_name, model_config, report_json,
                         run_cases)
from ..config import MODEL_BACKENDS
from ..restore import default_device
from .common import add_device_argument

# Timed rounds and untimed warm-up calls per case when not given. A 224² forward takes seconds on a
# CPU, so a few rounds give a stable median; on a GPU it takes milliseconds, and the first calls
# pay for autotuning and allocator growth.
ROUNDS = {"cpu": 5, "cuda": 30}
WARMUP = {"cpu": 2, "cuda": 5}
# Distinct inputs the timed calls rotate through: enough on a GPU that no call finds its image in L2.
INPUTS = {"cpu": 2, "cuda": 4}


def _csv(kind: Callable[[str], object]):
    def parse(text: str) -> list:
        items = [kind(s.strip()) for s in text.split(",") if s.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        return items

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", choices=("paper", "tiny"), default="paper",
                        help="model size (default: paper)")
    parser.add_argument("--size", type=_csv(int), default=[224],
                        help="image side(s) in pixels, comma-separated (default: 224, the paper's)")
    parser.add_argument("--backends", type=_csv(str), default=None,
                        help=f"comma-separated from {MODEL_BACKENDS} (default: reference plus ours: "
                             "'torch' on CPU, 'triton' on CUDA)")
    parser.add_argument("--dtypes", type=_csv(str), default=None,
                        help="comma-separated from fp32,bf16,fp16 (default: fp32,bf16 on CPU, all on CUDA)")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"timed rounds (default: {ROUNDS['cpu']} CPU, {ROUNDS['cuda']} CUDA)")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"untimed calls first (default: {WARMUP['cpu']} CPU, {WARMUP['cuda']} CUDA)")
    add_device_argument(parser)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice); on a busy machine 1 avoids "
                             "threads spinning while they wait for each other")
    parser.add_argument("--no-prior", action="store_true", help="skip the DA-CLIP pass (a null prior instead)")
    parser.add_argument("--compile", action="store_true", help="also time each backend under torch.compile")
    parser.add_argument("--graph", action="store_true",
                        help="also time the triton backend as a captured CUDA graph (the only capturable one)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the results here as JSON")
    parser.add_argument("--roofline", action="store_true",
                        help="also print the computed lower bound per component on H100/H200/RTX 3090 "
                             "beside the measured times (m2restore.cost_model)")


def cases_from_args(args: argparse.Namespace, device: torch.device) -> list[Case]:
    cuda = device.type == "cuda"
    backends = args.backends or ["reference", "triton" if cuda else "torch"]
    dtypes = args.dtypes or (["fp32", "bf16", "fp16"] if cuda else ["fp32", "bf16"])
    modes = ["eager"] + ["compile"] * args.compile + ["graph"] * args.graph
    # Modes outermost: a graph capture that fails can leave CUDA unusable, so captures come last.
    return [Case(b, m, d, not args.no_prior, s)
            for m in modes for s in args.size for d in dtypes for b in backends
            if m != "graph" or b in CAPTURABLE]


def run(args: argparse.Namespace) -> int:
    device = default_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("m2restore bench: --device cuda, but torch sees no CUDA device")
        return 2
    limits = (("--threads", args.threads, 1), ("--rounds", args.rounds, 1), ("--warmup", args.warmup, 0))
    for flag, value, least in limits:
        if value is not None and value < least:
            print(f"m2restore bench: {flag} must be at least {least}, got {value}")
            return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    kind = "cuda" if device.type == "cuda" else "cpu"
    rounds = args.rounds or ROUNDS[kind]
    warmup = args.warmup if args.warmup is not None else WARMUP[kind]
    try:
        cases = cases_from_args(args, device)
    except ValueError as exc:
        print(f"m2restore bench: {exc}")
        return 2
    machine = machine_name(device)
    print(f"m2restore bench: config {args.config}, batch 1, {len(cases)} case(s) on {machine}, "
          f"{warmup} warm-up + {rounds} timed rounds")
    session = BenchSession(args.config, device)
    results = run_cases(session, cases, rounds, warmup, n_inputs=INPUTS[kind])
    print(format_table(results, machine))
    if args.roofline:
        from ..cost_model import roofline_tables

        print("\n" + roofline_tables(model_config(args.config, "torch"), [r.to_dict() for r in results]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report_json(results, device, args.config, rounds, warmup), indent=2))
        print(f"wrote {args.json}")
    return 1 if any(r.error for r in results) else 0
