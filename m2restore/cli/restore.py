"""``m2restore restore INPUT... -o OUTDIR``: restore image files and folders (see :mod:`m2restore.restore`).

Each output keeps its input's size, format, bit depth, grayscale-ness, alpha channel, EXIF and ICC
profile. Images whose estimated peak memory above the process baseline exceeds ``--max-memory``
(default: half the available memory, at most 1.5 GiB) are restored in tiles; ``--tile N`` asks for N×N tiles. A file that cannot be
read does not stop the others: each is reported by name, a summary line follows, and the exit
status is 1. Paths and option values are checked before torch is imported.

``torchrun --nproc_per_node N -m m2restore restore ...`` restores on N processes (GPUs, or machines
with ``--nnodes``): process r takes the files r, r + N, r + 2N, ... of the sorted list, each file is
written once, and process 0 prints the summary for all of them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..options import parse_size
from ..paths import collect_inputs
from .common import add_model_arguments, check_model_arguments, check_output, device_from_args, resolve_dtype_from_args
from .errors import InputError, UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image files or folders (PNG, JPEG, WebP, TIFF, BMP; folders recursively)")
    parser.add_argument("-o", "--out", type=Path, required=True, help="output folder (created)")
    add_model_arguments(parser)
    parser.add_argument("--max-memory", default=None, metavar="SIZE",
                        help="peak memory of restoring one image above the process baseline (Python, torch and "
                             "its libraries: about 1 GiB, docs/design.md#tiling): the weights, the whole image's "
                             "buffers, the network's activations, the shared latent map; e.g. 3G or 512M; larger "
                             "images are tiled (default: half the available memory, at most 1.5G)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars (on a terminal) or progress lines (elsewhere)")


def run(args: argparse.Namespace) -> int:
    max_memory = _max_memory(args.max_memory)
    jobs = _jobs(args.inputs, args.out)
    check_model_arguments(args)

    from tqdm import tqdm

    from .. import distributed
    from ..data.io import UnreadableImageError
    from ..restore import default_memory_budget, load_model, restore_file
    from .progress import LineProgress

    budget = default_memory_budget() if max_memory is None else max_memory
    device = distributed.init(device_from_args(args.device))
    model = load_model(args.weights, device, args.backend, args.prior_checkpoint)
    resolve_dtype_from_args(args, device, model.config)  # auto's CPU rule looks at the network's width
    lead = distributed.is_main()
    mine = jobs[distributed.rank()::distributed.world_size()]

    # On a terminal, progress bars; elsewhere (a pipe, a log, a batch system) plain lines; process 0's only.
    show = not args.quiet and sys.stderr.isatty() and lead
    failed: list[tuple[Path, str]] = []
    out_dir = args.out.resolve()
    for number, (src, rel) in enumerate(tqdm(mine, desc="restore", unit="img", disable=not show or len(mine) == 1), 1):
        bar = tqdm(desc=src.name, unit="tile", leave=False, disable=not show)
        lines = None if show or args.quiet else LineProgress(f"{src.name} ({number}/{len(mine)})")

        def progress(total: int) -> None:
            bar.total = total
            bar.update()
            if lines is not None:
                lines(total)

        try:
            plan = restore_file(model, src, out_dir / rel, device, args.dtype, args.tile, args.tile_overlap,
                                budget, progress, args.stat_passes)
            if lines is not None:
                lines.finish("restored")
            if args.verbose:
                tqdm.write(f"m2restore restore: {src.name}: {_describe(plan)}", file=sys.stderr)
            if plan.memory.total > budget and not args.tile:  # the smallest tile did not fit
                tqdm.write(f"m2restore restore: {src.name}: needed an estimated {_gib(plan.memory.total)} above the "
                           f"process baseline even in {plan.tile}-pixel tiles, over --max-memory {_gib(budget)}",
                           file=sys.stderr)
        except UnreadableImageError as e:
            failed.append((src, e.reason))
            tqdm.write(f"m2restore restore: {e}", file=sys.stderr)
        except FileNotFoundError:
            failed.append((src, "vanished"))
            tqdm.write(f"m2restore restore: {src} disappeared before it was read", file=sys.stderr)
        except (OSError, ValueError) as e:
            failed.append((src, "not written"))
            tqdm.write(f"m2restore restore: cannot write {out_dir / rel}: {e}", file=sys.stderr)
        finally:
            bar.close()
    # Every process's failures, in rank order; each process reported its own files above.
    failed = [f for share in distributed.gather_objects(failed) for f in share]
    distributed.cleanup()
    done = len(jobs) - len(failed)
    if not lead:
        return 1 if failed else 0
    if failed:
        listed = ", ".join(f"{src.name} ({reason})" for src, reason in failed)
        raise InputError(f"restored {done} of {len(jobs)} into {out_dir}; failed: {listed}")
    print(f"restored {done} of {len(jobs)} into {out_dir}")
    return 0


def _max_memory(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return parse_size(text)
    except ValueError as e:
        raise UsageError(f"--max-memory: {e}") from e


def _jobs(inputs: list[str], out: Path) -> list[tuple[Path, Path]]:
    """collect_inputs, with its complaints and outputs that would overwrite an input as usage errors."""
    try:
        jobs = collect_inputs(inputs)
    except FileNotFoundError as e:
        raise UsageError(f"{e}; check the path") from e
    except ValueError as e:
        raise UsageError(str(e)) from e
    check_output(out, "--out")
    out_dir = out.resolve()
    for src, rel in jobs:
        if (out_dir / rel).resolve() == src.resolve():
            raise UsageError(f"--out {out} would overwrite the input {src}; choose another output folder")
    return jobs


def _describe(plan) -> str:
    """What --verbose says of how an image was restored (a :class:`m2restore.restore.TilePlan`)."""
    memory = f"estimated peak {_gib(plan.memory.total)} above the process baseline"
    if plan.tile == 0:
        return f"whole, {memory}"
    latent = "shared on the whole map" if plan.share_latent else "per tile"
    return f"{plan.tile}-pixel tiles, {plan.stat_passes} gathering passes, latent stage {latent}, {memory}"


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"
