"""Data-parallel training on 2 CPU processes (gloo), each started here as torchrun starts its
workers: forked, with RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set.

The router noise is off in these runs (``noise_keep_prob=0``: every noise draw is masked out, the
router stays in training mode), so one process with the whole batch is the reference.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import multiprocessing
import os
import socket
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

from m2restore import distributed
from m2restore import train as train_mod
from m2restore.assets import DEMO_WEIGHTS
from m2restore.cli import main
from m2restore.config import M2RestoreConfig
from m2restore.data import PairedImages
from m2restore.data.io import ImageData, write_image
from m2restore.data.synthetic import degrade

WORLD = 2
COLLECTIVE_TIMEOUT = 60  # seconds a process may wait for a peer: far above a loaded machine's step, far below DEADLINE
DEADLINE = 240  # seconds a launch may take in all before it counts as a hang (a loaded 2-core machine)
NOISE_OFF = {**M2RestoreConfig.tiny().to_dict(), "backend": "torch", "noise_keep_prob": 0.0}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread here as in each worker: the reference runs share 2 cores with them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(fn, *args) -> list[int]:
    """Run ``fn(rank, *args)`` in WORLD spawned processes with torchrun's environment; their exit
    codes (0: returned, 1: raised). Fails if any process is still running after DEADLINE."""
    # spawn, not fork: a parent that has already run autograd (any earlier test) cannot fork safely.
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(fn, rank, port, args)) for rank in range(WORLD)]
    for p in procs:
        p.start()
    end = time.monotonic() + DEADLINE
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, f"{len(hung)} process(es) still running after {DEADLINE} s"
    return [p.exitcode for p in procs]


def _worker(fn, rank: int, port: int, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    code = 0
    try:
        fn(rank, *args)
    except BaseException:
        traceback.print_exc()
        code = 1
    os._exit(code)  # leave without running the parent's (pytest's) exit handlers


# One optimizer step's gradient: 2 processes against 1.

def _float64_batches(n: int = 2, batch: int = 4, side: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"input": torch.rand(batch, 3, side, side, generator=g, dtype=torch.float64),
             "gt": torch.rand(batch, 3, side, side, generator=g, dtype=torch.float64)} for _ in range(n)]


def _float64_run(out: Path) -> train_mod.TrainRun:
    torch.manual_seed(0)
    # The plain reference ops: the kernel backends compute parts of the experts and the scan in float32.
    model = train_mod.build_model({**NOISE_OFF, "backend": "reference"}, quiet=True).double()
    return train_mod.setup_run(model, 8, out, train_mod.TrainOptions(batch_size=4, accum=2))


def _gradients(run: train_mod.TrainRun, batches: list[dict]) -> tuple[dict, torch.Tensor]:
    """Accumulate one step over ``batches``: ({name: grad}, (len(batches), 3) loss, L1, balance)."""
    sums = torch.stack([train_mod.accumulate_gradients(run, b, len(batches), sync=i == len(batches) - 1)
                        for i, b in enumerate(batches)])
    grads = {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}
    run.optimizer.zero_grad(set_to_none=True)
    return grads, sums


def _ddp_gradients(rank: int, out: Path) -> None:
    distributed.init(torch.device("cpu"), COLLECTIVE_TIMEOUT)
    run = _float64_run(out / f"run{rank}")
    half = [{k: v[2 * rank:2 * rank + 2] for k, v in b.items()} for b in _float64_batches()]
    grads, sums = _gradients(run, half)
    torch.save({"grads": grads, "sums": sums}, out / f"rank{rank}.pt")


def test_two_processes_take_the_gradient_of_one_with_the_whole_batch(tmp_path):
    """Float64, so that the only differences are the order of the sums (~1e-16 relative)."""
    assert _launch(_ddp_gradients, tmp_path) == [0, 0]
    run = _float64_run(tmp_path / "single")
    batches = _float64_batches()
    want, want_sums = _gradients(run, batches)
    # What two processes would get with each DDER's balance loss over its own half: the mean of
    # the halves' gradients. It must differ, or this test could not tell the reduction is there.
    halves = [_gradients(run, [{k: v[s] for k, v in b.items()} for b in batches])[0]
              for s in (slice(0, 2), slice(2, 4))]
    naive = {n: (halves[0][n] + halves[1][n]) / 2 for n in want}
    assert max(float((naive[n] - want[n]).abs().max() / want[n].abs().max().clamp_min(1e-30)) for n in want) > 1e-6
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert sorted(got["grads"]) == sorted(want)
        for name in want:
            # The Mamba mixer hands D and the Δ bias to the scan in float32 (as Mamba keeps them under
            # autocast), so their gradients are float32 sums: a few ulp of 6e-8 apart, not 1e-16.
            rtol = 1e-6 if name.endswith(("mamba.D", "mamba.dt_proj.bias")) else 1e-10
            torch.testing.assert_close(got["grads"][name], want[name], rtol=rtol, atol=rtol * 1e-3, msg=name)
        # Every process's balance is the global batch's; its L1 is its half's.
        torch.testing.assert_close(got["sums"][:, 2], want_sums[:, 2], rtol=1e-6, atol=0)  # float32 out
    assert want_sums[:, 2].min() > 0


# The command line on 2 processes, then resumed on 1.

@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    for i in range(8):
        clean = rng.random((10 + i, 12, 3)).astype(np.float32)
        write_image(root / "input" / f"im{i}.png", ImageData(degrade(clean, ("rain", "snow")[i % 2], i)))
        write_image(root / "gt" / f"im{i}.png", ImageData(clean))
    (root / "config.json").write_text(json.dumps(NOISE_OFF))
    return root


def _argv(pairs: Path, out: Path, *extra) -> list[str]:
    return ["train", "--data", str(pairs), "--out", str(out), "--config", str(pairs / "config.json"),
            "--crop", "8", "--batch-size", "4", "--accum", "1", "--epochs", "3", "--no-progress",
            "--dist-timeout", str(COLLECTIVE_TIMEOUT), *extra]


@contextlib.contextmanager
def _recording(record: dict):
    """Record the training items loaded (in order), the checkpoints written and the final weights."""
    get, save, fit = PairedImages.__getitem__, train_mod._save_checkpoint, train_mod.fit

    def getitem(self, index):
        if self.crop is not None:  # not the validation set
            record["seen"].append(int(index))
        return get(self, index)

    def save_checkpoint(path, payload):
        record["checkpoints"] += 1
        save(path, payload)

    def fit_and_keep(model, *args, **kwargs):
        summary = fit(model, *args, **kwargs)
        record["weights"] = {k: v.clone() for k, v in model.state_dict().items()}
        return summary

    record.update(seen=[], checkpoints=0)
    PairedImages.__getitem__, train_mod._save_checkpoint, train_mod.fit = getitem, save_checkpoint, fit_and_keep
    try:
        yield record
    finally:
        PairedImages.__getitem__, train_mod._save_checkpoint, train_mod.fit = get, save, fit


def _cli_worker(rank: int, argv: list[str], out: Path, exit_after_step: int | None = None) -> None:
    if exit_after_step is not None and rank == 1:
        step = train_mod.train_step

        def step_then_exit(run, *args):
            result = step(run, *args)
            if run.state.step == exit_after_step:
                os._exit(3)
            return result

        train_mod.train_step = step_then_exit
    err = io.StringIO()
    with _recording({}) as record, contextlib.redirect_stderr(err):
        status = main(argv)
    torch.save(record.pop("weights", {}), out / f"weights{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({**record, "status": status, "stderr": err.getvalue()}))


def _log(run: Path, name: str = "train_log.csv") -> list[dict]:
    with open(run / name) as f:
        return list(csv.DictReader(f))


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def test_two_process_run_resumes_on_one_with_the_same_samples(pairs, tmp_path):
    """2 processes train 3 steps (an epoch of 2 with sharded validation, then one more), with the
    same weights on both and one writer; 1 process resumes to step 4. Every step's global batch is
    the one a single-process run draws, and so are the losses, up to float32 rounding."""
    two, straight, info = tmp_path / "two", tmp_path / "straight", tmp_path / "info"
    info.mkdir()
    val = ("--val-data", str(pairs), "--val-limit", "3")
    assert _launch(_cli_worker, _argv(pairs, two, "--max-steps", "3", *val), info) == [0, 0]
    ranks = [json.loads((info / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [r["status"] for r in ranks] == [0, 0]
    assert ranks[0]["checkpoints"] >= 1 and ranks[1]["checkpoints"] == 0
    w0, w1 = (torch.load(info / f"weights{r}.pt", weights_only=True) for r in range(WORLD))
    assert sorted(w0) == sorted(w1) and all(torch.equal(w0[k], w1[k]) for k in w0)
    assert torch.load(two / "checkpoint.pt", weights_only=True)["state"]["step"] == 3

    with _recording({}) as resumed:
        assert main(_argv(pairs, two, "--max-steps", "4", "--resume", *val)) == 0
    with _recording({}) as single:
        assert main(_argv(pairs, straight, "--max-steps", "4", *val)) == 0

    steps = _chunks(single["seen"], 4)
    assert len(steps) == 4
    shares = [_chunks(r["seen"], 2) for r in ranks]
    for k in range(3):  # each process takes 2 items of the global batch, the two shares are disjoint
        assert sorted(shares[0][k] + shares[1][k]) == sorted(steps[k])
    assert resumed["seen"] == steps[3]

    got, want = _log(two), _log(straight)
    assert [int(r["step"]) for r in got] == [1, 2, 3, 4]
    assert float(got[0]["loss"]) == pytest.approx(float(want[0]["loss"]), rel=1e-5)  # same weights, same batch
    for g, w in zip(got[1:], want[1:]):  # after Adam steps on float32 gradients summed in another order
        assert float(g["loss"]) == pytest.approx(float(w["loss"]), rel=1e-3)
    assert len({r["loss"] for r in want}) == 4
    v_got, v_want = _log(two, "val_log.csv"), _log(straight, "val_log.csv")
    assert [r["step"] for r in v_got] == [r["step"] for r in v_want] == ["2"]  # step 4 stops before epoch 1's
    # Validation sharded over 2 processes (images 0, 2 and 1) against one process: same weights at step 2.
    assert float(v_got[0]["psnr"]) == pytest.approx(float(v_want[0]["psnr"]), abs=1e-3)


def test_a_process_that_exits_ends_the_job_with_an_error(pairs, tmp_path):
    info = tmp_path / "info"
    info.mkdir()
    started = time.monotonic()
    assert _launch(_cli_worker, _argv(pairs, tmp_path / "run", "--max-steps", "4"), info, 1) == [0, 3]
    assert time.monotonic() - started < DEADLINE
    rank0 = json.loads((info / "rank0.json").read_text())
    assert rank0["status"] == 1
    message = rank0["stderr"].strip()
    assert len(message.splitlines()) == 1, message
    assert message.startswith("m2restore train: process 0 of 2 stopped: another process exited"), message


def test_a_batch_that_does_not_divide_among_the_processes_is_a_usage_error(pairs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(_argv(pairs, tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--batch-size 4" in err and "3 processes" in err, err
    assert not (tmp_path / "checkpoint.pt").exists()


# restore and eval on 2 processes: each file restored once, by one process; one summary.

def _restore_eval_worker(rank: int, restore_argv: list[str], eval_argv: list[str], info: Path) -> None:
    """``m2restore restore`` then ``m2restore eval`` on this process, recording which files it
    restored, the statuses and what it printed."""
    from m2restore import restore as restore_mod

    restored, restore_file = [], restore_mod.restore_file

    def recording(model, src, *args, **kwargs):
        restored.append(src.name)
        return restore_file(model, src, *args, **kwargs)

    restore_mod.restore_file = recording
    record = {"restored": restored}
    for name, argv in (("restore", restore_argv), ("eval", eval_argv)):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            record[name] = main(argv)
        record[f"{name}_stdout"], record[f"{name}_stderr"] = out.getvalue(), err.getvalue()
    (info / f"rank{rank}.json").write_text(json.dumps(record))


def _run_flags() -> list[str]:
    return ["--device", "cpu", "--backend", "torch", "--dtype", "fp32"]


def test_restore_and_eval_split_the_files_over_two_processes(pairs, tmp_path):
    """The demo weights on 8 small images and an unreadable file in each process's share: the
    processes restore disjoint shares (files r, r + 2, ...), every output is written once and
    equals one process's, rank 0's summary names both failures and both processes exit with 1;
    eval's metrics over the 8 pairs equal one process's."""
    images, info = tmp_path / "images", tmp_path / "info"
    info.mkdir()
    images.mkdir()
    for src in sorted((pairs / "input").iterdir()):
        (images / src.name).write_bytes(src.read_bytes())
    bad = ["im3y.png", "im7z.png"]  # sorted after im3.png and im7.png: the 5th file (rank 0's), the 10th (rank 1's)
    for name in bad:
        (images / name).write_bytes(b"not an image")
    names = sorted(p.name for p in images.iterdir())
    restore = ["restore", str(images), "-o", str(tmp_path / "two"), "--quiet", *_run_flags()]
    evaluate = ["eval", "--data", str(pairs), "--weights", str(DEMO_WEIGHTS), "--out", str(tmp_path / "eval_two"),
                *_run_flags()]
    assert _launch(_restore_eval_worker, restore, evaluate, info) == [0, 0]
    ranks = [json.loads((info / f"rank{r}.json").read_text()) for r in range(WORLD)]

    assert [r["restored"] for r in ranks] == [names[0::2], names[1::2]]
    assert [r["restore"] for r in ranks] == [1, 1]
    summary = ranks[0]["restore_stderr"].strip().splitlines()[-1]
    assert summary.startswith(f"m2restore restore: restored {len(names) - 2} of {len(names)} into ")
    assert all(f"{name} (" in summary for name in bad), summary
    assert ranks[1]["restore_stdout"] == "" and "restored" not in ranks[1]["restore_stderr"]
    for rank, record in enumerate(ranks):  # each process reports its own unreadable file, once
        reports = [line for line in record["restore_stderr"].splitlines() if "cannot read image" in line]
        assert len(reports) == 1 and bad[rank] in reports[0], record["restore_stderr"]

    single = tmp_path / "one"
    assert main(["restore", str(images), "-o", str(single), "--quiet", *_run_flags()]) == 1
    written = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert written == sorted(p.name for p in single.iterdir()) == sorted(set(names) - set(bad))
    for name in written:
        assert (tmp_path / "two" / name).read_bytes() == (single / name).read_bytes(), name

    assert [r["eval"] for r in ranks] == [0, 0]
    assert "metrics written to" in ranks[0]["eval_stdout"] and ranks[1]["eval_stdout"] == ""
    assert main(["eval", "--data", str(pairs), "--weights", str(DEMO_WEIGHTS), "--out", str(tmp_path / "eval_one"),
                 *_run_flags()]) == 0
    two = json.loads((tmp_path / "eval_two" / "metrics.json").read_text())["sets"]
    one = json.loads((tmp_path / "eval_one" / "metrics.json").read_text())["sets"]
    assert two == one and one[0]["count"] == 8
