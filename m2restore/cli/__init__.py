"""M2Restore: all-in-one adverse-weather image restoration.

Each subcommand lives in its own module of this package, which exposes ``add_arguments(parser)``
and ``run(args) -> int`` and calls the library for the work; only the chosen one is imported, so
``--help`` stays fast."""
from __future__ import annotations

import argparse
import importlib
import sys

from ..allocator import retain_freed_memory
from .errors import CliError

COMMANDS = {
    "train": ("m2restore.cli.train", "train M2Restore on a paired data set"),
    "eval": ("m2restore.cli.evaluate", "PSNR/SSIM of trained weights on test sets (paper Table I)"),
    "restore": ("m2restore.cli.restore", "restore image files or folders"),
    "routing": ("m2restore.cli.routing", "expert-selection study of the DDERs (paper Fig. 8)"),
    "demo": ("m2restore.cli.demo", "restore bundled synthetic samples with the shipped tiny demo model"),
    "prior-cache": ("m2restore.cli.prior_cache", "precompute DA-CLIP priors (d_g, P_f) for a folder of images"),
    "bench": ("m2restore.cli.bench", "time the full model per backend against the paper's 0.17 s"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="m2restore", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if argv and argv[0] == name:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    args = parser.parse_args(argv)
    retain_freed_memory()  # every command moves large CPU tensors (see m2restore.allocator)
    try:
        return int(args._run(args) or 0)
    except CliError as e:
        print(f"m2restore {args.command}: {e}", file=sys.stderr)
        return e.exit_status
