"""``m2restore eval``: PSNR/SSIM of trained weights on test sets (see :mod:`m2restore.evaluate`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_model_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", nargs="+", required=True, metavar="[NAME=]PATH",
                        help="test sets: All-weather list files or folders with input/ and gt/")
    parser.add_argument("--out", type=Path, default=Path("eval"), help="folder for metrics.csv/json (default: eval)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate at most this many images per set")
    add_model_arguments(parser, weights_default=None)


def run(args: argparse.Namespace) -> int:
    from ..data import PairedImages, open_pairs
    from ..evaluate import evaluate_set, format_table, save_metrics
    from ..restore import autocast
    from .common import load_model_from_args, parse_set

    sets = [parse_set(s) for s in args.data]
    datasets = [(name, PairedImages(open_pairs(path), crop=None, flip=False)) for name, path in sets]
    model, device = load_model_from_args(args)
    with autocast(device, args.dtype):
        results = [evaluate_set(model, ds, name, device, args.tile, args.tile_overlap, args.limit,
                                stat_passes=args.stat_passes)
                   for name, ds in datasets]
    print(format_table(results, title=f"M2Restore ({args.weights})"))
    csv_path, json_path = save_metrics(results, args.out, args.weights)
    print(f"metrics written to {csv_path} and {json_path}")
    return 0
