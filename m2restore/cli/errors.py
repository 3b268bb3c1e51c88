"""Errors the command line reports as one line, never as a traceback.

``main`` catches :class:`CliError`, prints ``m2restore <command>: <message>`` to stderr and exits with
the error's status: 2 for a usage mistake (argparse's convention), 1 for an input that could not be
processed. ``--debug`` (or ``M2RESTORE_DEBUG=1``) shows the traceback instead.
"""
from __future__ import annotations


class CliError(Exception):
    """A failure the user can act on; the message names the file or option and what to do."""

    exit_status = 1


class UsageError(CliError):
    """A wrong option, path or combination of options (exit status 2)."""

    exit_status = 2


class InputError(CliError):
    """An input that could not be read or processed (exit status 1)."""

    exit_status = 1
