"""``m2restore train``: steps, atomic checkpoints, and a resume that continues bit for bit."""
import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from m2restore import train as train_mod
from m2restore.cli import main
from m2restore.data.io import ImageData, write_image
from m2restore.data.synthetic import degrade


@pytest.fixture(scope="module")
def allweather(tmp_path_factory) -> Path:
    """An All-weather layout: list file + {rain,snow}/{input,gt}, images of mixed sizes."""
    root = tmp_path_factory.mktemp("allweather")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(8):
        kind = ("rain", "snow")[i % 2]
        clean = rng.random((20 + 2 * i, 24, 3)).astype(np.float32)
        write_image(root / kind / "input" / f"im{i}.png", ImageData(degrade(clean, kind, i)))
        write_image(root / kind / "gt" / f"im{i}.png", ImageData(clean))
        lines.append(f"{kind}/input/im{i}.png")
    (root / "allweather.txt").write_text("\n".join(lines))
    return root / "allweather.txt"


def _train(data, out, *extra):
    return main(["train", "--data", str(data), "--out", str(out), "--config", "tiny", "--backend", "torch",
                 "--crop", "16", "--batch-size", "2", "--accum", "2", "--epochs", "3", "--no-progress", *extra])


def _losses(run: Path) -> dict[int, str]:
    with open(run / "train_log.csv") as f:
        return {int(r["step"]): r["loss"] for r in csv.DictReader(f)}


def test_two_steps_write_checkpoint_log_and_weights(allweather, tmp_path):
    assert _train(allweather, tmp_path, "--max-steps", "2", "--val-data", str(allweather)) == 0
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["state"]["step"] == 2 and ckpt["state"]["micro"] == 4 and ckpt["state"]["epoch"] == 0
    assert ckpt["options"]["lr"] == 2e-4 and ckpt["options"]["accum"] == 2
    assert not list(tmp_path.glob("*.tmp"))
    assert sorted(_losses(tmp_path)) == [1, 2]
    assert (tmp_path / "weights" / "model.safetensors").is_file()


def test_killed_run_resumes_with_the_uninterrupted_losses(allweather, tmp_path, monkeypatch):
    """Kill a run after it logged step 3 (its last checkpoint is step 2), resume it, and
    compare every later loss with an uninterrupted run's, exactly."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    val = ("--val-data", str(allweather), "--val-limit", "2")  # validation must not disturb the RNG streams
    _train(allweather, straight, "--max-steps", "5", *val)

    class Killed(Exception):
        pass

    write = train_mod._CsvLog.write

    def write_then_die(self, **row):
        write(self, **row)
        if row.get("step") == 3 and self.path.name == "train_log.csv":
            raise Killed

    monkeypatch.setattr(train_mod._CsvLog, "write", write_then_die)
    with pytest.raises(Killed):  # --debug: the command lets the exception through instead of one line
        _train(allweather, killed, "--max-steps", "5", "--ckpt-every", "2", "--debug", *val)
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["state"]["step"] == 2
    monkeypatch.setattr(train_mod._CsvLog, "write", write)
    _train(allweather, killed, "--max-steps", "5", "--ckpt-every", "2", "--resume", *val)
    want, got = _losses(straight), _losses(killed)
    assert sorted(got) == [1, 2, 3, 4, 5]  # the killed run's step-3 row was replaced
    assert got == want
    assert len(set(want.values())) == 5  # the losses differ from step to step: a real comparison
    for run in (straight, killed):  # validated after epochs 0 and 1 (steps 2 and 4), best weights kept
        with open(run / "val_log.csv") as f:
            assert [int(r["step"]) for r in csv.DictReader(f)] == [2, 4]
        assert (run / "best" / "model.safetensors").is_file()


def test_resume_without_checkpoint_fails(allweather, tmp_path, capsys):
    # a usage error (status 2), answered before torch is imported
    assert _train(allweather, tmp_path, "--resume") == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt" in err and err.count("\n") == 1 and "Traceback" not in err


def test_cosine_schedule_and_accumulation_groups():
    opts = train_mod.TrainOptions(lr=1e-3, min_lr=1e-5)
    f = train_mod._schedule(opts, 100)
    assert f(0) == pytest.approx(1.0) and f(100) == pytest.approx(0.01) and f(50) == pytest.approx(0.505)
    assert train_mod._accumulation_groups(10, 4) == [(0, 4), (4, 4), (8, 2)]
