"""``m2restore prior-cache``: precompute DA-CLIP priors for a folder of images (see :mod:`m2restore.prior.cache`)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import DEGRADATIONS, UNIT_RANGE, check_input_range
from ..options import PRIOR_BATCH_SIZE
from ..paths import find_images
from .common import add_device_argument, check_at_least, check_device_name, check_output, check_path, device_from_args
from .errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="DA-CLIP weights, e.g. daclip_ViT-B-32.pt from Algolzw/daclip-uir")
    parser.add_argument("--images", required=True, type=Path,
                        help="folder of images (searched recursively); cache keys are paths relative to it")
    parser.add_argument("--out", required=True, type=Path, help="output .safetensors file")
    add_device_argument(parser)
    parser.add_argument("--batch-size", type=int, default=PRIOR_BATCH_SIZE)
    parser.add_argument("--names", default=",".join(DEGRADATIONS),
                        help="comma-separated degradation names, as in the model config (default: %(default)s)")
    parser.add_argument("--preprocess", choices=("daclip", "bilinear"), default="daclip",
                        help="how images are prepared for CLIP; use the model config's prior_preprocess "
                             "(bilinear for M2RestoreConfig.authors()) (default: %(default)s)")
    parser.add_argument("--input-range", type=_input_range, default=UNIT_RANGE, metavar="LOW,HIGH",
                        help="the model config's input_range: images are mapped onto it before DA-CLIP "
                             "(-1,1 for M2RestoreConfig.authors()) (default: 0,1)")
    parser.add_argument("--fp16-text", action="store_true",
                        help="text features and similarity in float16, as the model config's prior_fp16_text "
                             "(set by M2RestoreConfig.authors())")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip config name of the DA-CLIP (default: %(default)s)")
    parser.add_argument("--model-config", type=Path, default=None,
                        help="JSON file of open_clip model config overrides (for non-standard DA-CLIPs)")


def run(args: argparse.Namespace) -> int:
    check_path(args.images, "--images", "folder")
    images = find_images(args.images)
    if not images:
        raise UsageError(f"--images {args.images}: no image files in it")
    check_path(args.checkpoint, "--checkpoint", "file")
    check_output(args.out, "--out", "file")
    check_at_least(args, batch_size=1)
    check_device_name(args.device)
    names = [n.strip() for n in args.names.split(",") if n.strip()]
    if not names:
        raise UsageError(f"--names {args.names!r}: give comma-separated degradation names")
    model_cfg = None
    if args.model_config is not None:
        check_path(args.model_config, "--model-config", "file")
        try:
            model_cfg = json.loads(args.model_config.read_text())
        except ValueError as e:
            raise UsageError(f"--model-config {args.model_config}: not JSON ({e})") from e

    from ..prior.cache import write_prior_cache
    from ..prior.daclip import DAClipPrior

    prior = DAClipPrior.from_checkpoint(args.checkpoint, names=names, model_name=args.model, model_cfg=model_cfg,
                                     preprocessing=args.preprocess, fp16_text=args.fp16_text)
    prior.to(device_from_args(args.device))
    count = write_prior_cache(prior, images, args.images, args.out, batch_size=args.batch_size,
                              metadata={"checkpoint": args.checkpoint.name}, input_range=args.input_range)
    print(f"prior-cache: {count} images -> {args.out} (names: {', '.join(names)}; {args.preprocess} preprocessing)")
    return 0


def _input_range(text: str) -> tuple[float, float]:
    """argparse type: ``LOW,HIGH``, checked as ``M2RestoreConfig.input_range`` is."""
    try:
        return check_input_range(text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not LOW,HIGH with LOW < HIGH (e.g. -1,1)") from err
