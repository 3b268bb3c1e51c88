"""``m2restore bench``: time the whole network per backend against the paper's 0.17 s per image
(see :mod:`m2restore.benchmark`)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..config import MODEL_BACKENDS
from ..options import PRECISION_NAMES
from .common import add_device_argument, check_at_least, check_device_name, check_output, device_from_args
from .errors import UsageError

if TYPE_CHECKING:
    import torch

    from ..benchmark import Case

# Timed rounds and untimed warm-up calls per case when not given, by default and with --full. A
# 224² forward takes seconds on a CPU, so a few rounds give a median; on a GPU it takes
# milliseconds, and the first calls pay for autotuning and allocator growth. The defaults take
# about a minute on a quiet 2-core AVX2 AMD EPYC (9 forwards of 4.4-5.5 s, bench/RESULTS.md);
# DEFAULT_BUDGET_S caps them on a slower or busy CPU.
ROUNDS = {"cpu": 3, "cuda": 20}
WARMUP = {"cpu": 1, "cuda": 5}
ROUNDS_FULL = {"cpu": 5, "cuda": 30}
WARMUP_FULL = {"cpu": 2, "cuda": 5}
# Every dtype a device is benchmarked in with --full (fp16 autocast has no fast CPU path).
DTYPES_FULL = {"cpu": ["fp32", "bf16"], "cuda": ["fp32", "bf16", "fp16"]}
# Distinct inputs the timed calls rotate through: enough on a GPU that no call finds its image in L2.
INPUTS = {"cpu": 2, "cuda": 4}
# Seconds a default CPU run (no --rounds, --warmup, --full) should take at most, as estimated from
# its first forward: past it the run drops its warm-up and then rounds, down to one timed round.
DEFAULT_BUDGET_S = 180.0


def _csv(kind: Callable[[str], object], choices: tuple | None = None):
    def parse(text: str) -> list:
        items = [kind(s.strip()) for s in text.split(",") if s.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        wrong = [item for item in items if choices is not None and item not in choices]
        if wrong:
            raise argparse.ArgumentTypeError(f"{', '.join(map(str, wrong))} not among {', '.join(choices)}")
        return items

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", choices=("paper", "tiny"), default="paper",
                        help="model size (default: paper)")
    parser.add_argument("--size", type=_csv(int), default=[224],
                        help="image side(s) in pixels, comma-separated (default: 224, the paper's)")
    parser.add_argument("--backends", type=_csv(str, MODEL_BACKENDS), default=None,
                        help=f"comma-separated from {MODEL_BACKENDS} (default: reference plus ours: "
                             "'torch' on CPU, 'triton' on CUDA)")
    parser.add_argument("--dtypes", type=_csv(str, PRECISION_NAMES), default=None,
                        help="comma-separated from fp32,bf16,fp16 (default: fp32, plus bf16 where it is native "
                             "as for --dtype auto; with --full: fp32,bf16 on CPU, all on CUDA)")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"timed rounds (default: {ROUNDS['cpu']} CPU, {ROUNDS['cuda']} CUDA; with --full "
                             f"{ROUNDS_FULL['cpu']}, {ROUNDS_FULL['cuda']})")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"untimed calls first (default: {WARMUP['cpu']} CPU, {WARMUP['cuda']} CUDA; with "
                             f"--full {WARMUP_FULL['cpu']}, {WARMUP_FULL['cuda']})")
    parser.add_argument("--full", action="store_true",
                        help="the long sweep: every dtype of the device and more rounds (on a CPU without native "
                             "bf16 its bf16 rows take many minutes)")
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


def default_dtypes(device: torch.device, config, full: bool = False) -> list[str]:
    """fp32, plus bf16 where ``--dtype auto`` picks it for a network of ``config`` on ``device``
    (:func:`resolve_precision`); ``full``: every dtype of :data:`DTYPES_FULL`."""
    from ..precision import resolve_precision

    if full:
        return DTYPES_FULL["cuda" if device.type == "cuda" else "cpu"]
    return list(dict.fromkeys(["fp32", resolve_precision("auto", device, config)[0]]))


def cases_from_args(args: argparse.Namespace, device: torch.device) -> list[Case]:
    from ..benchmark import CAPTURABLE, Case, model_config

    cuda = device.type == "cuda"
    backends = args.backends or ["reference", "triton" if cuda else "torch"]
    dtypes = args.dtypes or default_dtypes(device, model_config(args.config, "reference"), args.full)
    modes = ["eager"] + ["compile"] * args.compile + ["graph"] * args.graph
    # Modes outermost: a graph capture that fails can leave CUDA unusable, so captures come last.
    return [Case(b, m, d, not args.no_prior, s)
            for m in modes for s in args.size for d in dtypes for b in backends
            if m != "graph" or b in CAPTURABLE]


def planned_forwards(cases: list[Case], rounds: int, warmup: int) -> int:
    """Forwards a run of ``cases`` takes: the warm-up and timed calls of each, and one fp32
    reference output per prior and size."""
    return len(cases) * (warmup + rounds) + len({(c.prior, c.size) for c in cases})


def planned_seconds(first_s: float, cases: list[Case], rounds: int, warmup: int) -> float:
    """Estimated seconds of all forwards of a run of ``cases`` when the first case's reference
    output took ``first_s``: every forward costs that, scaled by pixels to its size."""
    pixels = sum(size ** 2 for _, size in {(c.prior, c.size) for c in cases})
    pixels += (warmup + rounds) * sum(c.size ** 2 for c in cases)
    return first_s * pixels / cases[0].size ** 2


def fit_to_budget(first_s: float, cases: list[Case], rounds: int, warmup: int,
                  budget_s: float = DEFAULT_BUDGET_S) -> tuple[int, int]:
    """(rounds, warmup) for a run of ``cases`` (:func:`planned_seconds` from ``first_s``) within
    ``budget_s``: the warm-up goes first, then rounds, down to one timed round (so one forward per
    case and reference output remains, whatever the budget)."""
    while warmup + rounds > 1 and planned_seconds(first_s, cases, rounds, warmup) > budget_s:
        if warmup:
            warmup -= 1
        else:
            rounds -= 1
    return rounds, warmup


class _Progress:
    """Prints a line per CPU forward to stderr (flushed: it shows under a pipe or in a log): which,
    its seconds, the run's elapsed time and an estimate of what is left."""

    def __init__(self, total: int, size: int):
        import time

        self.clock = time.perf_counter
        self.start = self.clock()
        self.total, self.done = total, 0
        self.size, self.pixel_s = size, 0.0  # seconds per pixel of the forwards so far

    def __call__(self, case: Case, what: str, seconds: float) -> None:
        self.done += 1
        self.pixel_s += seconds / case.size ** 2
        left = self.pixel_s / self.done * self.size ** 2 * (self.total - self.done)
        print(f"    forward {self.done}/{self.total}: {case.label} {case.dtype} {case.size}px {what}, "
              f"{seconds:.1f} s; {self.clock() - self.start:.0f} s elapsed, about {left:.0f} s left",
              file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    check_device_name(args.device)
    check_at_least(args, threads=1, rounds=1, warmup=0)
    if min(args.size) < 8:
        raise UsageError(f"--size must be at least 8 pixels, got {min(args.size)}")
    if args.json is not None:
        check_output(args.json, "--json", "file")

    import torch

    from ..benchmark import BenchSession, format_table, machine_name, model_config, report_json, run_cases
    from ..precision import resolve_precision

    device = device_from_args(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    kind = "cuda" if device.type == "cuda" else "cpu"
    rounds = args.rounds or (ROUNDS_FULL if args.full else ROUNDS)[kind]
    warmup = args.warmup if args.warmup is not None else (WARMUP_FULL if args.full else WARMUP)[kind]
    try:
        cases = cases_from_args(args, device)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    machine = machine_name(device)
    config = model_config(args.config, "reference")
    if args.dtypes is None and not args.full:
        print(f"  dtypes {','.join(default_dtypes(device, config))}: "
              f"{resolve_precision('auto', device, config)[1]} (--dtypes or --full for others)")
    session = BenchSession(args.config, device)
    progress = None
    first_s = None
    if kind == "cpu":  # forwards take seconds: say how many and how long, and keep a default run short
        progress = _Progress(planned_forwards(cases, rounds, warmup), cases[0].size)
        print(f"m2restore bench: {progress.total} forwards of {args.config}() planned; timing the first to "
              "estimate the run", file=sys.stderr, flush=True)
        first_s = _first_forward(session, cases[0], progress)
    if first_s is not None:
        planned = rounds, warmup
        if args.rounds is None and args.warmup is None and not args.full:
            rounds, warmup = fit_to_budget(first_s, cases, rounds, warmup, DEFAULT_BUDGET_S)
        progress.total = planned_forwards(cases, rounds, warmup)
        _estimate(first_s, progress.total, cases, rounds, warmup, capped=(rounds, warmup) != planned)
    print(f"m2restore bench: config {args.config}, batch 1, {len(cases)} case(s) on {machine}, "
          f"{warmup} warm-up + {rounds} timed rounds", flush=True)
    results = run_cases(session, cases, rounds, warmup, n_inputs=INPUTS[kind],
                        log=lambda line: print(line, flush=True), progress=progress)  # shows when piped too
    print(format_table(results, machine))
    if args.roofline:
        from ..cost_model import roofline_tables

        print("\n" + roofline_tables(model_config(args.config, "torch"), [r.to_dict() for r in results]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report_json(results, device, args.config, rounds, warmup), indent=2))
        print(f"wrote {args.json}")
    return 1 if any(r.error for r in results) else 0


def _first_forward(session, first: Case, progress: _Progress) -> float | None:
    """Seconds of ``first``'s fp32 reference output (which the run needs anyway), counted by
    ``progress``; None where it fails (``run_cases`` then reports the error with the case)."""
    from ..benchmark import make_inputs

    x = make_inputs(first.size, session.device, INPUTS["cpu"])[0]  # run_cases compares on the same image
    try:
        session.reference_output(first.prior, x)
    except Exception:  # noqa: BLE001 - reported by run_cases, which tries again
        return None
    seconds = session.reference_seconds[first.prior, first.size]
    progress(first.baseline, "reference output", seconds)
    return seconds


def _estimate(first_s: float, total: int, cases: list[Case], rounds: int, warmup: int, capped: bool) -> None:
    planned = planned_seconds(first_s, cases, rounds, warmup)
    left = planned - first_s
    note = ""
    if capped:
        fits = ("to fit" if planned <= DEFAULT_BUDGET_S else
                "to its least (one timed round per case), still over")
        note = (f"; the default run is cut {fits} the {DEFAULT_BUDGET_S / 60:.0f} min it aims at (--rounds, "
                "--warmup or --full choose)")
    more = f"{left:.0f} s" if left < 120 else f"{left / 60:.0f} min"
    print(f"m2restore bench: estimate {total} forwards at about {first_s:.1f} s each (the first, scaled by "
          f"pixels): about {more} more{note}", file=sys.stderr, flush=True)
