"""M2Restore: all-in-one adverse-weather image restoration.

Each subcommand lives in its own module of this package, which exposes ``add_arguments(parser)``
and ``run(args) -> int`` and calls the library for the work; only the chosen one is imported, and
this module imports neither torch nor the library, so ``--help`` and mistyped commands answer at
once.

Errors end in one line on stderr, ``m2restore COMMAND: message``: a :class:`~.errors.CliError`
with its exit status (2 for usage, 1 for a failed input), anything unexpected with status 1 and a
hint to rerun with ``--debug`` (or ``M2RESTORE_DEBUG=1``), which shows the traceback instead.
Argument errors exit with 2, argparse's convention.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import CliError, UsageError

COMMANDS = {
    "train": ("m2restore.cli.train", "train M2Restore on a paired data set"),
    "eval": ("m2restore.cli.evaluate", "PSNR/SSIM of trained weights on test sets (paper Table I)"),
    "restore": ("m2restore.cli.restore", "restore image files or folders"),
    "routing": ("m2restore.cli.routing", "expert-selection study of the DDERs (paper Fig. 8)"),
    "demo": ("m2restore.cli.demo", "restore bundled synthetic samples with the shipped tiny demo model"),
    "prior-cache": ("m2restore.cli.prior_cache", "precompute DA-CLIP priors (d_g, P_f) for a folder of images"),
    "bench": ("m2restore.cli.bench", "time the full model per backend against the paper's 0.17 s"),
    "convert-authors": ("m2restore.cli.convert_authors", "convert a checkpoint of the authors' training code to our weights folder"),
}
DEBUG_ENV = "M2RESTORE_DEBUG"


def _add_global_options(parser: argparse.ArgumentParser, default) -> None:
    """``--debug`` and ``--verbose``, accepted before or after the command (``default``:
    False on the main parser, ``argparse.SUPPRESS`` on the subcommands', so they do not reset it)."""
    parser.add_argument("--debug", action="store_true", default=default,
                        help=f"show the traceback of an error (also: {DEBUG_ENV}=1)")
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="say which choices were made for you (the --dtype auto precision)")


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named in ``argv``: its first word that is not an option (the global options
    take no value)."""
    return next((a for a in argv if not a.startswith("-")), None)


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser. It rejects the arguments it does not know itself, so that the error
    names the command and shows its usage (argparse leaves them to the main parser)."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser of ``m2restore``, with the arguments of ``command`` only (its module imported)."""
    parser = argparse.ArgumentParser(prog="m2restore", description=__doc__.splitlines()[0])
    _add_global_options(parser, False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_global_options(p, argparse.SUPPRESS)
        if name == command:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def _debugging(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_of(argv)
    prefix = f"m2restore {command}" if command in COMMANDS else "m2restore"
    try:
        args = build_parser(command if command in COMMANDS else None).parse_args(argv)
        from ..allocator import retain_freed_memory

        retain_freed_memory()  # every command moves large CPU tensors (see m2restore.allocator)
        return int(args._run(args) or 0)
    except CliError as err:
        if _debugging(argv):
            raise
        # Under torchrun every process parses the same flags: a usage error is said once, by rank 0.
        if not (isinstance(err, UsageError) and os.environ.get("RANK", "0") != "0"):
            print(f"{prefix}: {err}", file=sys.stderr)
        return err.exit_status
    except KeyboardInterrupt:
        if _debugging(argv):
            raise
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the last resort: one line, not a traceback
        if _debugging(argv):
            raise
        lines = str(err).strip().splitlines()
        print(f"{prefix}: {type(err).__name__}: {lines[0] if lines else 'no message'} "
              f"(rerun with --debug, or {DEBUG_ENV}=1, to see the traceback)", file=sys.stderr)
        return 1
