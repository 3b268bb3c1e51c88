"""``m2restore restore INPUT... -o OUTDIR``: restore image files and folders (see :mod:`m2restore.restore`).

Each output keeps its input's size, format, bit depth, grayscale-ness and alpha channel.
``--tile N`` restores big images in overlapping N×N tiles.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_model_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders (PNG/JPEG)")
    parser.add_argument("-o", "--out", type=Path, required=True, help="output folder (created)")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..restore import collect_inputs, restore_file
    from .common import load_model_from_args

    jobs = collect_inputs(args.inputs)
    if not jobs:
        raise ValueError("no PNG or JPEG images in the given inputs")
    model, device = load_model_from_args(args)
    out_dir = args.out.resolve()
    for src, rel in tqdm(jobs, desc="restore", unit="img", disable=len(jobs) == 1):
        dst = out_dir / rel
        if dst.resolve() == src.resolve():
            raise ValueError(f"refusing to overwrite the input {src}; choose another --out")
        restore_file(model, src, dst, device, args.dtype, args.tile, args.tile_overlap)
    print(f"restored {len(jobs)} image(s) into {out_dir}")
    return 0
