"""Options and argument parsing the subcommands share.

The helpers behind them are library code, so that programs reach them without the command line:
:func:`m2restore.restore.load_model`, :func:`m2restore.precision.resolve_precision` (``--dtype``),
:func:`~m2restore.restore.default_device` (``--device``) and the one image-folder walker,
:func:`m2restore.data.io.find_images`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import MODEL_BACKENDS
from ..assets import DEMO_WEIGHTS
from ..options import AUTO, CPU_BF16_MIN_DIM, DEFAULT_STAT_PASSES, PRECISION_CHOICES
from .errors import UsageError


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


def add_backend_argument(parser: argparse.ArgumentParser, help_text: str | None = None) -> None:
    parser.add_argument("--backend", choices=MODEL_BACKENDS, default=None, help=help_text)


def add_model_arguments(parser: argparse.ArgumentParser, weights_default: Path | None = DEMO_WEIGHTS) -> None:
    """Options every command that runs a trained model shares (read by :func:`load_model_from_args`)."""
    parser.add_argument("--weights", type=Path, default=weights_default, required=weights_default is None,
                        help="folder with config.json and model.safetensors"
                             + (" (default: the shipped demo weights)" if weights_default else ""))
    parser.add_argument("--prior-checkpoint", type=Path, default=None,
                        help="DA-CLIP checkpoint (daclip_ViT-B-32.pt) for weights trained with the prior")
    add_device_argument(parser)
    add_backend_argument(parser, "kernel backend (default: the one saved with the weights)")
    parser.add_argument("--dtype", choices=PRECISION_CHOICES, default=AUTO,
                        help="run the network under autocast to this dtype (fp32: none); auto (default): bf16 "
                             "on GPUs with bf16 tensor cores (A100 on) and on CPUs with native bf16 (AMX, "
                             f"AVX512-BF16) for networks of dim {CPU_BF16_MIN_DIM} or more (e.g. paper(), not the tiny demo), else "
                             "fp32 (AVX2 CPUs); -v says which and why")
    parser.add_argument("--tile", type=int, default=0,
                        help="restore in tiles of this size (0: the whole image, tiled only where it would not fit "
                             "in memory)")
    parser.add_argument("--tile-overlap", type=int, default=None,
                        help="overlap between tiles in pixels (default: from the network's receptive field)")
    parser.add_argument("--stat-passes", type=_count, default=DEFAULT_STAT_PASSES, metavar="N",
                        help="passes over the tiles that gather the whole image's attention and pooling statistics "
                             f"before the output pass (default {DEFAULT_STAT_PASSES}; each is one more forward per tile; "
                             "0: every tile uses its own, faster but further from the whole-image result)")


def device_from_args(name: str | None):
    """The torch device ``--device`` names (cuda when torch sees a GPU and none is named, else cpu),
    or a one-line :class:`UsageError` for a name torch does not know or a GPU it does not see."""
    import torch

    from ..restore import default_device

    try:
        device = default_device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name}: not a torch device ({e}); use cpu or cuda") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: torch sees no CUDA device here; use --device cpu or leave --device out")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: m2restore runs on cpu or cuda")
    return device


def load_model_from_args(args: argparse.Namespace):
    """(model, device) from the options of :func:`add_model_arguments`; ``args.dtype`` ``auto``
    becomes the precision chosen for that device, in place."""
    from ..restore import load_model

    device = device_from_args(args.device)
    model = load_model(args.weights, device, args.backend, args.prior_checkpoint)
    resolve_dtype_from_args(args, device, model.config)
    return model, device


def resolve_dtype_from_args(args: argparse.Namespace, device, config) -> str:
    """Replace ``args.dtype`` ``auto`` by the precision chosen for ``device`` and a network of
    ``config`` (:func:`m2restore.precision.resolve_precision`), saying which and why under ``--verbose``."""
    from ..precision import resolve_precision

    precision, why = resolve_precision(args.dtype, device, config)
    if args.dtype == AUTO and getattr(args, "verbose", False):
        print(f"m2restore: --dtype auto chose {precision} on {device}: {why}", file=sys.stderr)
    args.dtype = precision
    return precision


def parse_set(spec: str) -> tuple[str, Path]:
    """``name=path`` or ``path`` (named after the folder, or the list file's stem)."""
    name, sep, path = spec.partition("=")
    if sep:
        return name, Path(path)
    p = Path(spec)
    return (p.stem if p.is_file() else p.name), p


def _count(text: str) -> int:
    """argparse type: a whole number >= 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 0 or more")
    return int(text)
