"""Progress of long commands written as plain lines, for a stderr that is not a terminal (a pipe, a
log file, a batch system), where a progress bar's redrawn line shows nothing until the end.

:class:`LineProgress` says how a tiled image is going at most every :data:`INTERVAL` seconds;
:func:`format_seconds` writes a duration. The clock is an argument (default :func:`monotonic`), so tests drive it.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

#: Seconds between two progress lines of one image: often enough for a log, few lines per hour.
INTERVAL = 30.0


def monotonic() -> float:
    """The clock :class:`LineProgress` reads unless given one (tests replace it)."""
    return time.monotonic()


def format_seconds(seconds: float) -> str:
    """``"42 s"``, ``"3 min 05 s"``, ``"2 h 07 min"``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class LineProgress:
    """Progress lines of one image's tile forwards on ``stream`` (flushed), at most one per
    ``interval`` seconds of ``clock``: forwards done / total (the gathering passes included),
    elapsed time and the estimated time left (elapsed / done × remaining)."""

    def __init__(self, label: str, stream: TextIO | None = None, clock: Callable[[], float] | None = None,
                 interval: float = INTERVAL):
        self.label, self.stream, self.interval = label, stream or sys.stderr, interval
        self.clock = clock or monotonic
        self.start = self.last = self.clock()
        self.done = 0

    def __call__(self, total: int) -> None:
        """One more forward of ``total`` (the ``progress`` callback of :func:`m2restore.restore.restore_tensor`)."""
        self.done += 1
        now = self.clock()
        if now - self.last < self.interval or self.done >= total:
            return
        self.last = now
        elapsed = now - self.start
        left = elapsed / self.done * (total - self.done)
        self.write(f"{self.done}/{total} tile forwards, {format_seconds(elapsed)} elapsed, "
                   f"about {format_seconds(left)} left")

    def finish(self, what: str) -> None:
        """The image's closing line: ``what`` happened, and how long it took."""
        self.write(f"{what} in {format_seconds(self.clock() - self.start)}")

    def write(self, text: str) -> None:
        print(f"m2restore restore: {self.label}: {text}", file=self.stream, flush=True)
