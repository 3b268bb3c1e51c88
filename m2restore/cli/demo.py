"""``m2restore demo``: restore the bundled samples with the shipped tiny model, or train it again
with ``--train`` (see :mod:`m2restore.demo`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..assets import DEMO_WEIGHTS
from ..options import CHECKPOINT, DEMO_BATCH_SIZE, DEMO_CROP, DEMO_LR, DEMO_LR_DECAY
from .common import check_at_least, check_output, check_path, check_positive, weights_config

# Training time budget of --train, minutes: what the shipped weights were trained with.
MINUTES = 25.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo"), help="output folder (default: demo)")
    parser.add_argument("--weights", type=Path, default=DEMO_WEIGHTS, help="weights to show (default: shipped)")
    parser.add_argument("--train", action="store_true", help="train the demo model instead of showing it")
    parser.add_argument("--minutes", type=float, default=MINUTES, help="training time budget (with --train)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: fitted to --minutes)")
    parser.add_argument("--crop", type=int, default=DEMO_CROP, help="training crop size")
    parser.add_argument("--batch-size", type=int, default=DEMO_BATCH_SIZE)
    parser.add_argument("--lr", type=float, default=DEMO_LR,
                        help=f"peak learning rate (cosine decay to {100 // DEMO_LR_DECAY}%%)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is much faster than the default on a busy machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue an interrupted --train run in OUT/run")


def run(args: argparse.Namespace) -> int:
    check_output(args.out, "--out")
    check_at_least(args, steps=1, crop=1, batch_size=1, threads=1)
    check_positive(args, "minutes", "lr")
    if args.train and args.resume:
        check_path(args.out / "run" / CHECKPOINT, "--resume: the checkpoint", "file")
    if not args.train:
        weights_config(args.weights)

    import torch

    from ..demo import before_after_grid, format_measure, measure, restore_samples, train_demo

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.train:
        s = train_demo(args.out, args.minutes, args.steps, args.crop, args.batch_size, args.lr, args.seed,
                       args.resume)
        print(f"trained {s['steps']} steps in {s['seconds']:.0f} s ({s['steps_per_s']:.2f} steps/s, "
              f"batch {args.batch_size} of {args.crop}×{args.crop}); weights in {args.out}")
        print(format_measure(s["held_out"]))
        return 0
    from ..restore import load_model

    model = load_model(args.weights, "cpu", "torch")
    pairs = restore_samples(model)
    grid = args.out / "demo_grid.png"
    before_after_grid(pairs, grid)
    print(f"before/after grid of {len(pairs)} bundled samples: {grid}")
    print(format_measure(measure(model)))
    return 0
