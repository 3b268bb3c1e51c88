"""Train M2Restore with the paper's recipe (``m2restore train --data ... --out RUN_DIR``).

Defaults are the paper's (§IV-A): Adam, learning rate 2e-4, 200 epochs, batch 2 with gradient
accumulation over 4 batches (effective batch 8), random 224×224 crops with horizontal and
vertical flips, loss L1 + 0.01 · Σ balance. The paper names an *initial* learning rate without a
schedule; we decay it by a cosine to ``--min-lr`` over the run (``--schedule constant`` keeps it).

RUN_DIR holds ``checkpoint.pt`` (model without the frozen prior, optimizer, schedule, AMP scaler, epoch and position in
the epoch, RNG states; written to a temporary file and renamed, so a killed run loses at most one
checkpoint interval), ``train_log.csv`` (one row per optimizer step), ``val_log.csv``,
``weights/`` (the final weights, loadable with ``M2Restore.from_pretrained``) and ``best/`` (best
validation PSNR). ``--resume`` continues bit-for-bit: the data order and augmentations are
functions of (seed, epoch, index), and the global RNGs (which drive the router noise) are
restored from the checkpoint.

Under torchrun (:mod:`m2restore.distributed`) the same code trains data-parallel with
``DistributedDataParallel``: ``batch_size`` is the global batch, each of the W processes takes its
batch_size / W items of every batch, the DDER balance loss is that of the global batch, and the
data order (global batches in order) does not depend on W, so a run resumes on any number of
processes. Rank 0 alone writes logs, checkpoints and weights; validation is sharded over the ranks.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import itertools
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from . import distributed
from .options import CHECKPOINT, TrainOptions  # noqa: F401 - CHECKPOINT: this module's API too

TRAIN_LOG_FIELDS = ("step", "epoch", "loss", "l1", "balance", "lr", "images_per_s", "peak_mem_gib", "seconds")
VAL_LOG_FIELDS = ("step", "epoch", "psnr", "ssim")
# Options that define the optimisation trajectory; on --resume they come from the checkpoint.
_TRAJECTORY = ("epochs", "batch_size", "accum", "lr", "min_lr", "schedule", "seed", "total_steps")
# The seed of epoch e's data order is seed × stride + e: a prime above any epoch count, so that
# no two (seed, epoch) pairs of a run share an order.
_EPOCH_SEED_STRIDE = 100003
# Weight of the previous value in the progress bar's moving average of the loss (~ the last 10 steps).
_LOSS_SMOOTHING = 0.9


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainState:
    """Where a run stands; saved in every checkpoint (as a dict) and restored on resume."""

    epoch: int = 0  # the epoch in progress (= epochs completed)
    micro: int = 0  # batches of that epoch already trained on
    step: int = 0  # optimizer steps taken
    seconds: float = 0.0  # training time so far, over all sessions of the run
    best_psnr: float = -math.inf  # best validation PSNR (dB), whose weights are in best/


@dataclass
class TrainRun:
    """A run between steps: the model and what optimises it, the position, the logs.

    An epoch is ``batches_per_epoch`` (global) batches of ``opts.batch_size`` items; ``groups``
    cuts it into optimizer steps of ``opts.accum`` batches, (first batch, number of batches) each.
    ``model`` is the network itself (saved, validated); ``net`` is what training forwards go
    through: ``model``, or its DistributedDataParallel wrapper, compiled with ``opts.compile``.
    """

    model: torch.nn.Module
    net: torch.nn.Module
    opts: TrainOptions
    device: torch.device
    out_dir: Path
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    use_amp: bool  # the forward pass runs under autocast to amp_dtype
    amp_dtype: torch.dtype
    state: TrainState
    batches_per_epoch: int
    groups: list[tuple[int, int]]
    total_steps: int
    train_log: "_CsvLog"
    val_log: "_CsvLog"
    rank: int = 0  # this process's place among the world_size processes of the run
    world_size: int = 1
    started: float = 0.0  # time.perf_counter() at which state.seconds was 0

    @property
    def steps_per_epoch(self) -> int:
        return len(self.groups)


def fit(model, train_set, out_dir: str | Path, opts: TrainOptions, device: str | torch.device = "cpu",
        val_set=None, resume: bool = False, progress: bool = True) -> dict:
    """Train ``model`` on ``train_set`` (items: dicts with ``input``/``gt`` (3, h, w) float32
    tensors in [0, 1], optionally the cached priors ``d_g`` (D,) and ``P_f`` (E,)), validating on
    ``val_set`` (whole images) every ``opts.val_every`` epochs; with ``resume``, continue the run
    in ``out_dir`` from its checkpoint. In a process group (:func:`m2restore.distributed.init`)
    every process calls it with the same arguments. Returns a summary: steps, epoch, seconds,
    steps_per_epoch, total_steps, world_size, and peak_mem_gib (CUDA: each process's peak
    memory in GiB, in rank order; else empty)."""
    run = setup_run(model, len(train_set), out_dir, opts, device, resume)
    state = run.state
    bar = _Progress(run.opts.max_steps or run.total_steps, state.step, progress and run.rank == 0, run.rank == 0)
    stop = run.opts.max_steps is not None and state.step >= run.opts.max_steps
    run.started = time.perf_counter() - state.seconds
    while state.epoch < run.opts.epochs and not stop:
        stop = train_epoch(run, train_set, bar)
        if stop:
            break
        end_epoch(run, val_set, bar)
    bar.close()
    if run.rank == 0:
        model.save_pretrained(run.out_dir / "weights")
    peaks = distributed.gather_rows(torch.tensor([_peak_memory_gib(run.device)]))[:, 0]
    distributed.barrier()  # the weights are written when any process returns
    return {"steps": state.step, "epoch": state.epoch, "seconds": state.seconds,
            "steps_per_epoch": run.steps_per_epoch, "total_steps": run.total_steps,
            "world_size": run.world_size, "peak_mem_gib": [] if peaks.isnan().any() else peaks.tolist()}


def setup_run(model, num_items: int, out_dir: str | Path, opts: TrainOptions, device: str | torch.device = "cpu",
              resume: bool = False) -> TrainRun:
    """Move ``model`` to ``device`` in train mode and build its optimizer, learning-rate schedule
    and loss scaler for a training set of ``num_items`` items; with ``resume``, restore them, the
    position, the RNG states and the options that define the trajectory from
    ``out_dir/checkpoint.pt`` and drop log rows written after it; else start empty logs.
    In a process group, wrap ``model`` in DistributedDataParallel (which copies rank 0's
    weights to every process) and give each process a router-noise stream of its own."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    rank, world = distributed.rank(), distributed.world_size()
    if opts.batch_size % world:
        raise ValueError(f"the global batch size {opts.batch_size} does not divide among {world} processes")
    model.to(device).train()
    batches_per_epoch = num_items // opts.batch_size
    if batches_per_epoch == 0:
        raise ValueError(f"the training set has {num_items} image(s), fewer than one batch of {opts.batch_size}")
    groups = _accumulation_groups(batches_per_epoch, opts.accum)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=opts.lr)
    use_amp = opts.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    state = TrainState()

    if resume:
        ckpt = load_checkpoint(out_dir / CHECKPOINT)
        saved = TrainOptions(**ckpt["options"])
        changed = [k for k in _TRAJECTORY if getattr(saved, k) != getattr(opts, k)]
        if changed and rank == 0:
            print(f"resume: keeping the checkpoint's {', '.join(f'{k}={getattr(saved, k)}' for k in changed)}")
        opts = dataclasses.replace(opts, **{k: getattr(saved, k) for k in _TRAJECTORY})
    total_steps = opts.total_steps or opts.epochs * len(groups)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(opts, total_steps))
    if resume:
        model.load_weights(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["schedule"])
        scaler.load_state_dict(ckpt["scaler"])
        state = TrainState(**ckpt["state"])
        rng = ckpt.get("rng_ranks") or [ckpt["rng"]]
        # The same number of processes continues every stream; another number continues rank 0's
        # and starts the others afresh.
        _set_rng_state(rng[rank] if len(rng) == world else rng[0])
        if len(rng) != world and rank > 0:
            _seed_rank(opts.seed, rank, state.step)
        if rank == 0:
            _truncate_log(out_dir / "train_log.csv", state.step, TRAIN_LOG_FIELDS)
            _truncate_log(out_dir / "val_log.csv", state.step, VAL_LOG_FIELDS)
    else:
        if rank > 0:
            _seed_rank(opts.seed, rank, 0)
        if rank == 0:
            for name in ("train_log.csv", "val_log.csv"):
                (out_dir / name).unlink(missing_ok=True)
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # The depthwise convs' weight gradients come back in another (equally dense) layout than
        # DDP's buckets; DDP copies them and warns on every rank, which says nothing a user can act on.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        # Some parameters take no gradient (the AFLB's rate convs feed an integer box size).
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=True)
    if opts.compile:
        # Static shapes: training crops are one size, and symbolic sizes trip inductor on the
        # model's padding arithmetic; a differently sized last batch compiles once more.
        net = torch.compile(net, dynamic=False)
    log = rank == 0
    return TrainRun(model, net, opts, device, out_dir, optimizer, schedule, scaler, use_amp, amp_dtype,
                    state, batches_per_epoch, groups, total_steps,
                    train_log=_CsvLog(out_dir / "train_log.csv", TRAIN_LOG_FIELDS, log),
                    val_log=_CsvLog(out_dir / "val_log.csv", VAL_LOG_FIELDS, log),
                    rank=rank, world_size=world)


def save_checkpoint(run: TrainRun) -> None:
    """Write ``run``'s complete state to ``out_dir/checkpoint.pt``, atomically. Every process of
    a run calls it (their RNG states are gathered); rank 0 writes."""
    rng = distributed.gather_objects(_rng_state())
    if run.rank != 0:
        return
    _save_checkpoint(run.out_dir / CHECKPOINT, {
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "schedule": run.schedule.state_dict(), "scaler": run.scaler.state_dict(),
        "state": dataclasses.asdict(run.state), "rng": rng[0], "rng_ranks": rng,
        "options": dataclasses.asdict(run.opts), "config": run.model.config.to_dict()})


def epoch_batches(opts: TrainOptions, num_items: int, epoch: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """The item indices of process ``rank``'s share of every batch of ``epoch``:
    (num_items // batch_size, batch_size // world_size). The global batches are a permutation
    that depends on (seed, epoch) only, whatever ``world_size``; the last num_items % batch_size
    items of it are left out; process r takes the r-th slice of each."""
    per_epoch = num_items // opts.batch_size
    generator = torch.Generator().manual_seed(opts.seed * _EPOCH_SEED_STRIDE + epoch)
    order = torch.randperm(num_items, generator=generator)
    batches = order[:per_epoch * opts.batch_size].view(per_epoch, world_size, opts.batch_size // world_size)
    return batches[:, rank].tolist()


def train_epoch(run: TrainRun, train_set, bar: "_Progress") -> bool:
    """Train the epoch ``run.state.epoch`` from its batch ``run.state.micro`` on, one optimizer
    step per group of batches, logging and checkpointing as the options say. Returns True when
    ``max_steps`` or ``max_seconds`` stopped it (after a checkpoint), False at the epoch's end."""
    from torch.utils.data import DataLoader

    opts, state, epoch = run.opts, run.state, run.state.epoch
    if hasattr(train_set, "set_epoch"):
        train_set.set_epoch(epoch)
    batches = epoch_batches(opts, len(train_set), epoch, run.rank, run.world_size)
    # The loader gets its own generator: creating an iterator would otherwise draw from
    # the global torch RNG and shift the router noise of a resumed run.
    loader = iter(DataLoader(train_set, batch_sampler=batches[state.micro:], num_workers=opts.workers,
                             generator=torch.Generator().manual_seed(0)))
    for first, size in run.groups:
        if first < state.micro:
            continue
        t0 = time.perf_counter()
        lr = run.optimizer.param_groups[0]["lr"]  # the rate this step uses
        loss, l1, balance = train_step(run, itertools.islice(loader, size), size)
        state.micro = first + size
        state.seconds = time.perf_counter() - run.started
        ips = size * opts.batch_size / (time.perf_counter() - t0)  # of all processes together
        peak = _peak_memory_gib(run.device)
        run.train_log.write(step=state.step, epoch=epoch, loss=loss, l1=l1, balance=balance, lr=lr,
                            images_per_s=ips, peak_mem_gib="" if math.isnan(peak) else peak, seconds=state.seconds)
        bar.update(epoch, loss, ips)
        stop = _should_stop(run)
        if opts.max_seconds is not None:  # the clocks differ: all stop when one does
            stop = distributed.any_rank(stop)
        if stop or (opts.ckpt_every and state.step % opts.ckpt_every == 0):
            save_checkpoint(run)
        if stop:
            return True
    return False


def train_step(run: TrainRun, batches: Iterable[dict], count: int) -> tuple[float, float, float]:
    """One optimizer step on the gradient of the mean loss over ``count`` batches (loader
    batches: ``input`` and ``gt`` (B, 3, h, w), optionally ``d_g`` (B, D) and ``P_f`` (B, E)),
    drawn from ``batches`` one at a time; then the schedule's step. With several processes, each
    passes its shares of the same batches and the gradients are averaged over the processes once,
    on the last batch. Returns the batches' mean (loss, L1, Σ balance) over all processes."""
    sums = torch.zeros(3)
    for i, batch in enumerate(batches):
        sums += accumulate_gradients(run, batch, count, sync=i == count - 1)
    sums = distributed.gather_rows(sums).mean(0)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.schedule.step()
    run.state.step += 1
    loss, l1, balance = (sums / count).tolist()
    return loss, l1, balance


def accumulate_gradients(run: TrainRun, batch: dict, count: int, sync: bool = True) -> torch.Tensor:
    """Forward ``batch`` (as in :func:`train_step`; with several processes, this process's share
    of a global batch) and add the gradient of its loss / ``count`` to the parameters' ``.grad``,
    so that ``count`` calls accumulate the gradient of their mean; with several processes,
    averaged over them when ``sync`` (the last batch of a step), kept local otherwise. Returns
    (3,) float32 on the CPU: this process's loss, L1 and Σ balance (of the global batch)."""
    device = run.device
    x, gt = batch["input"].to(device), batch["gt"].to(device)
    prior = (batch["d_g"].to(device), batch["P_f"].to(device)) if "d_g" in batch else None
    local = run.world_size > 1 and not sync
    with run.net.no_sync() if local else contextlib.nullcontext(), distributed.global_batch():
        with torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.use_amp):
            out, aux = run.net(x, prior=prior, return_aux=True)
            loss, l1, balance = _loss(run.model, out.float(), gt, aux)
        run.scaler.scale(loss / count).backward()
    return torch.stack([loss.detach(), l1.detach(), balance.detach()]).float().cpu()


def end_epoch(run: TrainRun, val_set, bar: "_Progress") -> None:
    """Close the epoch ``run.state.epoch``: validate when due (keeping the best weights in
    ``best/``), move on to the next epoch and save a checkpoint."""
    state, epoch = run.state, run.state.epoch
    if val_set is not None and (epoch + 1) % run.opts.val_every == 0:
        psnr, ssim = _validate(run, val_set)
        run.val_log.write(step=state.step, epoch=epoch, psnr=psnr, ssim=ssim)
        bar.write(f"epoch {epoch}: validation PSNR {psnr:.2f} dB, SSIM {ssim:.4f}")
        if psnr > state.best_psnr:
            state.best_psnr = psnr
            if run.rank == 0:
                run.model.save_pretrained(run.out_dir / "best")
    state.epoch, state.micro = epoch + 1, 0
    save_checkpoint(run)


def _should_stop(run: TrainRun) -> bool:
    opts, state = run.opts, run.state
    return (opts.max_steps is not None and state.step >= opts.max_steps) or (
        opts.max_seconds is not None and state.seconds >= opts.max_seconds)


class _Progress:
    """The progress bar: optimizer steps, with the epoch, a smoothed loss and images per second;
    ``messages``: print the validation lines (whether or not the bar is ``enabled``)."""

    def __init__(self, total: int, initial: int, enabled: bool, messages: bool = True):
        from tqdm import tqdm

        self.messages = messages
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled,
                        dynamic_ncols=True)
        self.smoothed: float | None = None

    def update(self, epoch: int, loss: float, images_per_s: float) -> None:
        decay = _LOSS_SMOOTHING
        self.smoothed = loss if self.smoothed is None else decay * self.smoothed + (1 - decay) * loss
        self.bar.update(1)
        self.bar.set_postfix(epoch=epoch, loss=f"{self.smoothed:.4f}", img_s=f"{images_per_s:.1f}")

    def write(self, message: str) -> None:
        if self.messages:
            self.bar.write(message)

    def close(self) -> None:
        self.bar.close()


def _loss(model, out, gt, aux):
    """(total, L1, Σ balance): the paper's objective L1 + λ Σ_levels balance."""
    from .losses import m2restore_loss

    weight = model.config.balance_weight
    total = m2restore_loss(out, gt, aux.balance_loss, weight)
    return total, total.detach() - weight * aux.balance_loss.detach(), aux.balance_loss


@torch.no_grad()
def _validate(run: TrainRun, val_set) -> tuple[float, float]:
    """(PSNR, SSIM) means over ``val_set``, the same on every process: each process restores its
    share of the images (:func:`m2restore.evaluate.evaluate_set`). Its eval-mode forwards are the
    network's alone (no collectives inside)."""
    from .evaluate import evaluate_set

    run.model.eval()
    try:
        result = evaluate_set(run.model, val_set, "validation", run.device, progress=False)
    finally:
        run.model.train()
    return result.psnr, result.ssim


def _peak_memory_gib(device: torch.device) -> float:
    """The most memory this process's CUDA ``device`` held so far, GiB; NaN elsewhere."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan


def _accumulation_groups(micro: int, accum: int) -> list[tuple[int, int]]:
    """(first batch, number of batches) of each optimizer step in an epoch; the last group
    takes what is left so that no batch is skipped."""
    return [(i, min(accum, micro - i)) for i in range(0, micro, accum)]


def _schedule(opts: TrainOptions, total_steps: int):
    """LR multiplier per step: cosine from 1 to min_lr/lr over ``total_steps``, or constant."""
    floor = opts.min_lr / opts.lr

    def factor(step: int) -> float:
        if opts.schedule == "constant":
            return 1.0
        t = min(step, total_steps) / max(1, total_steps)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))

    return factor


def _rng_state() -> dict:
    # Only tensors, numbers, strings and tuples, so that checkpoints load with weights_only=True.
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _seed_rank(seed: int, rank: int, step: int) -> None:
    """Give process ``rank`` > 0 its own router-noise stream, a function of (seed, rank, step)."""
    torch.manual_seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0]))


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(path: Path, payload: dict) -> None:
    """Write to a temporary file beside ``path``, then rename: a reader (or a resumed run after
    a kill) sees the old checkpoint or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    """A training checkpoint (model, optimizer, schedule, RNG states, options), loaded safely."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


class _CsvLog:
    """Append-only CSV with a header, flushed per row so a killed run keeps its log; writes
    nothing unless ``enabled`` (the processes of a run other than rank 0)."""

    def __init__(self, path: Path, fields: tuple[str, ...], enabled: bool = True):
        self.path, self.fields, self.enabled = path, fields, enabled

    def write(self, **row) -> None:
        if not self.enabled:
            return
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields)
            if new:
                writer.writeheader()
            writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})


def _truncate_log(path: Path, step: int, fields: tuple[str, ...]) -> None:
    """Drop rows logged after the checkpoint a run resumes from (the killed run's tail), and
    rewrite the rest with the columns ``fields`` (empty where a log of an older version lacks one)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(r for r in rows if int(r["step"]) <= step)


def build_model(config: str | dict, backend: str | None = None, prior_checkpoint: str | Path | None = None,
                quiet: bool = False):
    """M2Restore from ``tiny``/``paper``, a JSON file or a dict of config fields; the DA-CLIP
    prior when a checkpoint is given, else the null prior (``quiet``: cached priors stand in)."""
    from .model import M2Restore, M2RestoreConfig
    from .prior import NullPrior

    cfg = _make_config(M2RestoreConfig, config)
    if backend:
        cfg = dataclasses.replace(cfg, backend=backend)
    if prior_checkpoint is None:
        if not quiet:
            print("training without the DA-CLIP prior (NullPrior); pass --prior-checkpoint or --prior-cache "
                  "for the paper's setup")
            # Saved with the weights, so that running them without a prior does not warn.
            cfg = dataclasses.replace(cfg, trained_with_prior=False)
        return M2Restore(cfg, prior=NullPrior(cfg.num_degradations, cfg.prior_dim))
    from .prior import DAClipPrior

    prior = DAClipPrior.from_checkpoint(prior_checkpoint, names=cfg.degradation_names,
                                        preprocessing=cfg.prior_preprocess, fp16_text=cfg.prior_fp16_text)
    return M2Restore(cfg, prior=prior)


def _make_config(cls, spec):
    if isinstance(spec, dict):
        return cls.from_dict(spec)
    if spec in ("tiny", "paper"):
        return getattr(cls, spec)()
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"--config must be tiny, paper or a JSON file; {spec} not found")
    return cls.from_dict(json.loads(path.read_text()))
