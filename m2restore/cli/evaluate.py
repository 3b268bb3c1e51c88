"""``m2restore eval``: PSNR/SSIM of trained weights on test sets (see :mod:`m2restore.evaluate`).

``torchrun --nproc_per_node N -m m2restore eval ...`` evaluates on N processes: each restores its
share of every set's images, the means are over all of them (as one process takes them), and
process 0 prints the table and writes the metrics."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..options import Y_METRICS
from .common import (add_model_arguments, check_at_least, check_model_arguments, check_output, check_paired_data,
                     device_from_args, parse_set, resolve_dtype_from_args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", nargs="+", required=True, metavar="[NAME=]PATH",
                        help="test sets: All-weather list files or folders with input/ and gt/")
    parser.add_argument("--out", type=Path, default=Path("eval"), help="folder for metrics.csv/json (default: eval)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate at most this many images per set")
    parser.add_argument("--resize", action="append", default=[], metavar="NAME=WxH",
                        help="resize set NAME's inputs and ground truths to W×H (8-bit, PIL bicubic) before "
                             "restoring, as the authors' test loader does for RainDrop (raindrop=720x480); repeatable")
    parser.add_argument("--y-metric", choices=Y_METRICS, default=Y_METRICS[0],
                        help="how the Y row is scored: ycbcr (default: BT.601 luma of the clamped 8-bit output) or "
                             "chw-view (the authors' val_utils.py: the unclamped float output's (3, H, W) buffer read "
                             "as (H, W, 3), OpenCV's BGR luma, SSIM down each column)")
    add_model_arguments(parser, weights_default=None)


def run(args: argparse.Namespace) -> int:
    sets = [parse_set(s) for s in args.data]
    check_paired_data([path for _, path in sets], "--data")
    check_output(args.out, "--out")
    check_at_least(args, limit=1)
    check_model_arguments(args)
    resize = _resizes(args.resize, [name for name, _ in sets])

    from .. import distributed
    from ..data import PairedImages, open_pairs
    from ..evaluate import evaluate_set, format_table, save_metrics
    from ..restore import autocast, load_model

    datasets = [(name, PairedImages(open_pairs(path), crop=None, flip=False)) for name, path in sets]
    device = distributed.init(device_from_args(args.device))
    model = load_model(args.weights, device, args.backend, args.prior_checkpoint)
    resolve_dtype_from_args(args, device, model.config)
    lead = distributed.is_main()
    with autocast(device, args.dtype):
        results = [evaluate_set(model, ds, name, device, args.tile, args.tile_overlap, args.limit,
                                progress=lead, stat_passes=args.stat_passes, resize=resize.get(name),
                                y_metric=args.y_metric)
                   for name, ds in datasets]
    distributed.cleanup()
    if lead:
        print(format_table(results, title=f"M2Restore ({args.weights})"))
        if args.y_metric != "ycbcr" or resize:
            print("Y row: " + {"ycbcr": "BT.601", "chw-view": "the authors' chw-view luma"}[args.y_metric]
                  + "".join(f"; {name} resized to {w}x{h}" for name, (w, h) in resize.items()))
        csv_path, json_path = save_metrics(results, args.out, args.weights,
                                           {"y_metric": args.y_metric, "resize": resize})
        print(f"metrics written to {csv_path} and {json_path}")
    return 0


def _resizes(specs: list[str], names: list[str]) -> dict[str, tuple[int, int]]:
    """``--resize NAME=WxH`` options -> {set name: (w, h)}, naming the one that does not parse."""
    from .errors import UsageError

    out = {}
    for spec in specs:
        name, _, size = spec.partition("=")
        w, _, h = size.lower().partition("x")
        if name not in names:
            raise UsageError(f"--resize {spec}: no set named {name!r} in --data (sets: {', '.join(names)})")
        if not (w.isdigit() and h.isdigit() and int(w) > 0 and int(h) > 0):
            raise UsageError(f"--resize {spec}: give NAME=WxH with positive whole numbers, e.g. raindrop=720x480")
        out[name] = (int(w), int(h))
    return out
