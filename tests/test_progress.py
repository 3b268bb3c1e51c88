"""Progress of ``m2restore restore`` when stderr is not a terminal: a line per image and, for tiled
images, at most one every 30 s of a fake clock (so the throttle is checked without waiting)."""
import io

import numpy as np
import pytest
from PIL import Image

from m2restore.cli import main, progress
from m2restore.options import DEFAULT_STAT_PASSES


class FakeClock:
    """Each reading is ``step`` seconds after the previous one."""

    def __init__(self, step: float):
        self.now, self.step = -step, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_format_seconds():
    assert [progress.format_seconds(s) for s in (0, 42.4, 60, 185, 3600, 7625)] == [
        "0 s", "42 s", "1 min 00 s", "3 min 05 s", "1 h 00 min", "2 h 07 min"]


def test_lines_at_most_every_interval_with_the_estimate():
    stream = io.StringIO()
    times = iter([0.0, 10, 29.9, 30, 45, 59.9, 60.1, 200, 210])
    lines = progress.LineProgress("a.png", stream, clock=lambda: next(times))
    for _ in range(7):  # forwards end at 10, 29.9, 30, 45, 59.9, 60.1, 200 s
        lines(8)
    lines(8)  # the last forward (210 s): the closing line says it
    got = stream.getvalue().splitlines()
    # 30 s after the start (3 forwards: 10 s each, 5 to go), then 30.1 s after that, then at 200 s.
    assert got == ["m2restore restore: a.png: 3/8 tile forwards, 30 s elapsed, about 50 s left",
                   "m2restore restore: a.png: 6/8 tile forwards, 1 min 00 s elapsed, about 20 s left",
                   "m2restore restore: a.png: 7/8 tile forwards, 3 min 20 s elapsed, about 29 s left"]


@pytest.fixture
def image(tmp_path):
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(tmp_path / "small.png")
    return tmp_path


def test_restore_without_a_terminal_prints_throttled_lines(image, capsys, monkeypatch):
    """Under pytest's capture stderr is not a terminal: no bar, but a line per image and, while the
    tiles run, one line per 30 s of the clock (10 s per reading here: every third forward)."""
    monkeypatch.setattr(progress, "monotonic", FakeClock(10.0))
    args = ["restore", str(image / "small.png"), str(image / "x.png"), "-o", str(image / "out"), "--tile", "32",
            "--tile-overlap", "8", "--device", "cpu", "--dtype", "fp32"]
    assert main(args) == 0
    err = capsys.readouterr().err.splitlines()
    total = 4 * (DEFAULT_STAT_PASSES + 1)  # 2 × 2 tiles of 32 (the second flush with the end), once per pass
    # The image's clock reads 0 at its start and 10·k after its k-th forward.
    expected = ["m2restore restore: small.png (1/2): restored in 10 s"]  # whole: no tile forwards
    expected += [f"m2restore restore: x.png (2/2): {k}/{total} tile forwards, {progress.format_seconds(10 * k)} "
                 f"elapsed, about {progress.format_seconds(10 * (total - k))} left" for k in range(3, total, 3)]
    expected.append(f"m2restore restore: x.png (2/2): restored in {progress.format_seconds(10 * (total + 1))}")
    assert [line for line in err if line.startswith("m2restore restore:")] == expected
    assert not any("\r" in line or "it/s" in line for line in err)  # no tqdm bar
    assert (image / "out" / "x.png").is_file() and (image / "out" / "small.png").is_file()


def test_quiet_prints_no_progress_lines(image, capsys, monkeypatch):
    monkeypatch.setattr(progress, "monotonic", FakeClock(100.0))
    assert main(["restore", str(image / "x.png"), "-o", str(image / "q"), "--tile", "32", "--device", "cpu",
                 "--dtype", "fp32", "--quiet"]) == 0
    assert "m2restore restore:" not in capsys.readouterr().err
