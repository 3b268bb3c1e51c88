"""Options and argument parsing the subcommands share, and the checks of paths and option values
that every command runs before it imports torch or numpy (so that a mistake is answered at once;
importing torch takes seconds, tens of seconds on a busy machine).

The helpers behind them are library code, so that programs reach them without the command line:
:func:`m2restore.restore.load_model`, :func:`m2restore.precision.resolve_precision` (``--dtype``),
:func:`~m2restore.restore.default_device` (``--device``) and the one image-folder walker,
:func:`m2restore.data.io.find_images`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import CONFIG_NAME, MODEL_BACKENDS, M2RestoreConfig, saved_config
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


def check_model_arguments(args: argparse.Namespace) -> M2RestoreConfig:
    """The options of :func:`add_model_arguments`, checked without torch: ``--device`` names a
    device m2restore runs on, ``--weights`` holds a model, ``--prior-checkpoint`` is a file, the
    tile sizes fit the network; returns the weights' config."""
    check_device_name(args.device)
    config = weights_config(args.weights)
    if args.prior_checkpoint is not None:
        check_path(args.prior_checkpoint, "--prior-checkpoint", "file")
    check_tiling(args.tile, args.tile_overlap, config.pad_multiple)
    return config


def check_device_name(name: str | None) -> None:
    """``--device``: none (the default), ``cpu`` or ``cuda``, each with an optional ``:INDEX``."""
    if name is None:
        return
    kind, colon, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (colon and not index.isdigit()):
        raise UsageError(f"--device {name}: m2restore runs on cpu or cuda (cuda:N for one GPU of several)")


def weights_config(weights: Path) -> M2RestoreConfig:
    """The config of the weights folder ``--weights`` names, read without torch."""
    try:
        return saved_config(weights)
    except FileNotFoundError as e:
        raise UsageError(f"--weights: {e}") from e
    except (ValueError, TypeError) as e:  # bad JSON, unknown or invalid fields
        raise UsageError(f"--weights: {weights / CONFIG_NAME} is not an M2Restore config ({e})") from e


def check_path(path: Path, option: str, kind: str | None = None) -> None:
    """``path`` exists, and is a ``"file"`` or a ``"folder"`` when ``kind`` says so."""
    if not path.exists():
        raise UsageError(f"{option} {path}: not found; check the path")
    if kind == "file" and not path.is_file():
        raise UsageError(f"{option} {path} is a folder; give a file")
    if kind == "folder" and not path.is_dir():
        raise UsageError(f"{option} {path} is a file; give a folder")


def check_output(path: Path, option: str, kind: str = "folder") -> None:
    """An output ``path`` that does not exist yet or is of ``kind`` (``"folder"`` or ``"file"``)."""
    if path.exists():
        check_path(path, option, kind)


def check_paired_data(specs, option: str) -> None:
    """Paired data (:func:`m2restore.data.open_pairs`): list files, or folders with input/ and gt/."""
    for spec in specs:
        path = Path(spec)
        if not path.exists():
            raise UsageError(f"{option} {path}: not found; give an All-weather list file or a folder with input/ "
                             "and gt/")
        if path.is_dir() and not ((path / "input").is_dir() and (path / "gt").is_dir()):
            raise UsageError(f"{option} {path}: a data folder needs input/ and gt/ inside")


def check_at_least(args: argparse.Namespace, **least) -> None:
    """Each option ``dest=minimum``: its value, when given, is at least the minimum."""
    for dest, low in least.items():
        value = getattr(args, dest)
        if value is not None and value < low:
            raise UsageError(f"--{dest.replace('_', '-')} must be at least {low}, got {value}")


def check_positive(args: argparse.Namespace, *dests: str) -> None:
    """Each option in ``dests``: its value, when given, is above 0."""
    for dest in dests:
        value = getattr(args, dest)
        if value is not None and not value > 0:
            raise UsageError(f"--{dest.replace('_', '-')} must be positive, got {value}")


def check_tiling(tile: int, overlap: int | None, multiple: int) -> None:
    """--tile and --tile-overlap against each other and the network's padding ``multiple``. The
    default overlap (:func:`m2restore.restore.default_overlap`) is at most a quarter of the tile."""
    m = multiple
    if tile < 0:
        raise UsageError(f"--tile {tile}: give a positive tile size (a multiple of {m}), or 0 to tile only "
                         "when an image exceeds --max-memory")
    if overlap is not None and overlap < 0:
        raise UsageError(f"--tile-overlap {overlap}: give 0 or more pixels")
    if tile == 0:
        return
    if tile % m or tile < 4 * m:
        raise UsageError(f"--tile {tile}: the network works on multiples of {m} pixels; give a multiple of {m} "
                         f"from {4 * m} up (e.g. {max(4 * m, tile // m * m)})")
    # The tiles' overlap is rounded up to the multiple too (restore_tensor).
    if overlap is not None and -(-overlap // m) * m >= tile:
        raise UsageError(f"--tile {tile} must be larger than --tile-overlap {overlap} (rounded up to a multiple of "
                         f"{m}); raise --tile or lower --tile-overlap")


def device_from_args(name: str | None):
    """The torch device ``--device`` names (cuda when torch sees a GPU and none is named, else cpu),
    or a one-line :class:`UsageError` for a name that is not cpu or cuda (:func:`check_device_name`,
    which the commands run before they import torch) or a GPU torch does not see."""
    check_device_name(name)
    import torch

    from ..restore import default_device

    device = default_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: torch sees no CUDA device here; use --device cpu or leave --device out")
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
