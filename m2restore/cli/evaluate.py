"""``m2restore eval``: PSNR/SSIM of trained weights on test sets (see :mod:`m2restore.evaluate`).

``torchrun --nproc_per_node N -m m2restore eval ...`` evaluates on N processes: each restores its
share of every set's images, the means are over all of them (as one process takes them), and
process 0 prints the table and writes the metrics."""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import (add_model_arguments, check_at_least, check_model_arguments, check_output, check_paired_data,
                     device_from_args, parse_set, resolve_dtype_from_args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", nargs="+", required=True, metavar="[NAME=]PATH",
                        help="test sets: All-weather list files or folders with input/ and gt/")
    parser.add_argument("--out", type=Path, default=Path("eval"), help="folder for metrics.csv/json (default: eval)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate at most this many images per set")
    add_model_arguments(parser, weights_default=None)


def run(args: argparse.Namespace) -> int:
    sets = [parse_set(s) for s in args.data]
    check_paired_data([path for _, path in sets], "--data")
    check_output(args.out, "--out")
    check_at_least(args, limit=1)
    check_model_arguments(args)

    from .. import distributed
    from ..data import PairedImages, open_pairs
    from ..evaluate import evaluate_set, format_table, save_metrics
    from ..restore import autocast, load_model

    datasets = [(name, PairedImages(open_pairs(path), crop=None, flip=False)) for name, path in sets]
    device = distributed.init(device_from_args(args.device))
    resolve_dtype_from_args(args, device)
    model = load_model(args.weights, device, args.backend, args.prior_checkpoint)
    lead = distributed.is_main()
    with autocast(device, args.dtype):
        results = [evaluate_set(model, ds, name, device, args.tile, args.tile_overlap, args.limit,
                                progress=lead, stat_passes=args.stat_passes)
                   for name, ds in datasets]
    distributed.cleanup()
    if lead:
        print(format_table(results, title=f"M2Restore ({args.weights})"))
        csv_path, json_path = save_metrics(results, args.out, args.weights)
        print(f"metrics written to {csv_path} and {json_path}")
    return 0
