"""``m2restore train --data ... --out RUN_DIR``: train M2Restore with the paper's recipe.

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
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"
TRAIN_LOG_FIELDS = ("step", "epoch", "loss", "l1", "balance", "lr", "images_per_s", "seconds")
VAL_LOG_FIELDS = ("step", "epoch", "psnr", "ssim")
# Options that define the optimisation trajectory; on --resume they come from the checkpoint.
_TRAJECTORY = ("epochs", "batch_size", "accum", "lr", "min_lr", "schedule", "seed", "total_steps")


@dataclass
class TrainOptions:
    """How to train. A *step* is one optimizer update (``accum`` batches of ``batch_size``)."""

    epochs: int = 200
    batch_size: int = 2
    accum: int = 4
    lr: float = 2e-4
    min_lr: float = 1e-6
    schedule: str = "cosine"  # "cosine" | "constant"
    seed: int = 0
    total_steps: int | None = None  # schedule length; None: epochs × steps per epoch
    workers: int = 0
    ckpt_every: int = 0  # steps between checkpoints; 0: only at the end of each epoch
    val_every: int = 1  # epochs between validations
    max_steps: int | None = None  # stop (with a checkpoint) after this many steps in all
    max_seconds: float | None = None  # stop (with a checkpoint) after this much training time
    amp: bool = True  # autocast on CUDA (bf16 where supported, else fp16 with loss scaling)

    def __post_init__(self):
        for name in ("epochs", "batch_size", "accum", "val_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.ckpt_every < 0:
            raise ValueError(f"ckpt_every must be non-negative, got {self.ckpt_every}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fit(model, train_set, out_dir: str | Path, opts: TrainOptions, device: str | torch.device = "cpu",
        val_set=None, resume: bool = False, progress: bool = True) -> dict:
    """Train ``model`` on ``train_set`` (items: dicts with ``input``/``gt`` (3, h, w) tensors,
    optionally ``d_g``/``P_f``); returns a summary: steps, epoch, seconds, steps_per_epoch, total_steps."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    model.to(device).train()
    micro_per_epoch = len(train_set) // opts.batch_size
    if micro_per_epoch == 0:
        raise ValueError(f"the training set has {len(train_set)} image(s), fewer than one batch of {opts.batch_size}")
    groups = _accumulation_groups(micro_per_epoch, opts.accum)
    steps_per_epoch = len(groups)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=opts.lr)
    use_amp = opts.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    state = {"epoch": 0, "micro": 0, "step": 0, "seconds": 0.0, "best_psnr": -math.inf}

    if resume:
        ckpt = load_checkpoint(out_dir / CHECKPOINT)
        saved = TrainOptions(**ckpt["options"])
        changed = [k for k in _TRAJECTORY if getattr(saved, k) != getattr(opts, k)]
        if changed:
            print(f"resume: keeping the checkpoint's {', '.join(f'{k}={getattr(saved, k)}' for k in changed)}")
        opts = dataclasses.replace(opts, **{k: getattr(saved, k) for k in _TRAJECTORY})
    total_steps = opts.total_steps or opts.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(opts, total_steps))
    if resume:
        model.load_weights(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["schedule"])
        scaler.load_state_dict(ckpt["scaler"])
        state = ckpt["state"]
        _set_rng_state(ckpt["rng"])
        _truncate_log(out_dir / "train_log.csv", state["step"])
        _truncate_log(out_dir / "val_log.csv", state["step"])
    else:
        for name in ("train_log.csv", "val_log.csv"):
            (out_dir / name).unlink(missing_ok=True)

    train_log = _CsvLog(out_dir / "train_log.csv", TRAIN_LOG_FIELDS)
    val_log = _CsvLog(out_dir / "val_log.csv", VAL_LOG_FIELDS)

    def save():
        _save_checkpoint(out_dir / CHECKPOINT, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(), "scaler": scaler.state_dict(), "state": dict(state),
            "rng": _rng_state(), "options": dataclasses.asdict(opts), "config": model.config.to_dict()})

    bar = tqdm(total=opts.max_steps or total_steps, initial=state["step"], desc="train", unit="step",
               disable=not progress, dynamic_ncols=True)
    smoothed = None
    stop = opts.max_steps is not None and state["step"] >= opts.max_steps
    start_time = time.perf_counter() - state["seconds"]
    while state["epoch"] < opts.epochs and not stop:
        epoch = state["epoch"]
        if hasattr(train_set, "set_epoch"):
            train_set.set_epoch(epoch)
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(opts.seed * 100003 + epoch))
        batches = order[:micro_per_epoch * opts.batch_size].view(micro_per_epoch, opts.batch_size).tolist()
        # The loader gets its own generator: creating an iterator would otherwise draw from
        # the global torch RNG and shift the router noise of a resumed run.
        loader = iter(DataLoader(train_set, batch_sampler=batches[state["micro"]:], num_workers=opts.workers,
                                 generator=torch.Generator().manual_seed(0)))
        for first, size in groups:
            if first < state["micro"]:
                continue
            t0 = time.perf_counter()
            sums = torch.zeros(3)
            for _ in range(size):
                batch = next(loader)
                x, gt = batch["input"].to(device), batch["gt"].to(device)
                prior = (batch["d_g"].to(device), batch["P_f"].to(device)) if "d_g" in batch else None
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    out, aux = model(x, prior=prior, return_aux=True)
                    loss, l1, balance = _loss(model, out.float(), gt, aux)
                scaler.scale(loss / size).backward()
                sums += torch.stack([loss.detach(), l1.detach(), balance.detach()]).float().cpu()
            lr = optimizer.param_groups[0]["lr"]  # the rate this step used
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            state["step"] += 1
            state["micro"] = first + size
            state["seconds"] = time.perf_counter() - start_time
            loss_v, l1_v, bal_v = (sums / size).tolist()
            ips = size * opts.batch_size / (time.perf_counter() - t0)
            train_log.write(step=state["step"], epoch=epoch, loss=loss_v, l1=l1_v, balance=bal_v,
                            lr=lr, images_per_s=ips, seconds=state["seconds"])
            smoothed = loss_v if smoothed is None else 0.9 * smoothed + 0.1 * loss_v
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{smoothed:.4f}", img_s=f"{ips:.1f}")
            stop = (opts.max_steps is not None and state["step"] >= opts.max_steps) or (
                opts.max_seconds is not None and state["seconds"] >= opts.max_seconds)
            if stop or (opts.ckpt_every and state["step"] % opts.ckpt_every == 0):
                save()
            if stop:
                break
        if stop:
            break
        if val_set is not None and (epoch + 1) % opts.val_every == 0:
            result = _validate(model, val_set, device)
            val_log.write(step=state["step"], epoch=epoch, psnr=result.psnr, ssim=result.ssim)
            bar.write(f"epoch {epoch}: validation PSNR {result.psnr:.2f} dB, SSIM {result.ssim:.4f}")
            if result.psnr > state["best_psnr"]:
                state["best_psnr"] = result.psnr
                model.save_pretrained(out_dir / "best")
        state["epoch"], state["micro"] = epoch + 1, 0
        save()
    bar.close()
    model.save_pretrained(out_dir / "weights")
    return {"steps": state["step"], "epoch": state["epoch"], "seconds": state["seconds"],
            "steps_per_epoch": steps_per_epoch, "total_steps": total_steps}


def _loss(model, out, gt, aux):
    """(total, L1, Σ balance): the paper's objective L1 + λ Σ_levels balance."""
    from .losses import m2restore_loss

    weight = model.config.balance_weight
    total = m2restore_loss(out, gt, aux.balance_loss, weight)
    return total, total.detach() - weight * aux.balance_loss.detach(), aux.balance_loss


@torch.no_grad()
def _validate(model, val_set, device):
    from .evaluate import evaluate_set

    model.eval()
    try:
        return evaluate_set(model, val_set, "val", device, progress=False)
    finally:
        model.train()


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
    """Append-only CSV with a header, flushed per row so a killed run keeps its log."""

    def __init__(self, path: Path, fields: tuple[str, ...]):
        self.path, self.fields = path, fields

    def write(self, **row) -> None:
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields)
            if new:
                writer.writeheader()
            writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})


def _truncate_log(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint a run resumes from (the killed run's tail)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
        fields = rows[0].keys() if rows else None
    if fields is None:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
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
        return M2Restore(cfg, prior=NullPrior(cfg.num_degradations, cfg.prior_dim))
    from .prior import DAClipPrior

    prior = DAClipPrior.from_checkpoint(prior_checkpoint, names=cfg.degradation_names,
                                        preprocessing=cfg.prior_preprocess)
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainOptions()
    parser.add_argument("--data", nargs="+", required=True, metavar="PATH",
                        help="training data: All-weather list files and/or folders with input/ and gt/")
    parser.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, logs, weights)")
    parser.add_argument("--val-data", nargs="*", default=(), metavar="PATH", help="validation data (whole images)")
    parser.add_argument("--val-limit", type=int, default=None, help="validate on at most this many images")
    parser.add_argument("--config", default="paper", help="tiny, paper or a JSON file of M2RestoreConfig fields")
    parser.add_argument("--backend", choices=("auto", "triton", "torch", "reference"), default=None)
    parser.add_argument("--prior-checkpoint", type=Path, default=None, help="DA-CLIP checkpoint (default: no prior)")
    parser.add_argument("--prior-cache", type=Path, default=None, help="precomputed priors (m2restore prior-cache)")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--accum", type=int, default=d.accum, help="batches per optimizer step")
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--min-lr", type=float, default=d.min_lr)
    parser.add_argument("--schedule", choices=("cosine", "constant"), default=d.schedule)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--workers", type=int, default=d.workers, help="data loader processes")
    parser.add_argument("--ckpt-every", type=int, default=d.ckpt_every, help="steps between checkpoints (0: per epoch)")
    parser.add_argument("--val-every", type=int, default=d.val_every, help="epochs between validations")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-amp", dest="amp", action="store_false", help="no autocast on CUDA")
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def run(args: argparse.Namespace) -> int:
    from .data import PairedImages, open_pairs
    from .restore import default_device

    opts = TrainOptions(epochs=args.epochs, batch_size=args.batch_size, accum=args.accum, lr=args.lr,
                        min_lr=args.min_lr, schedule=args.schedule, seed=args.seed, workers=args.workers,
                        ckpt_every=args.ckpt_every, val_every=args.val_every, max_steps=args.max_steps,
                        amp=args.amp)
    config = args.config
    if args.resume:
        ckpt = load_checkpoint(args.out / CHECKPOINT)
        config, seed = ckpt["config"], ckpt["options"]["seed"]
        del ckpt
    else:
        seed = opts.seed
    seed_everything(seed)
    model = build_model(config, args.backend, args.prior_checkpoint, quiet=args.prior_cache is not None)
    prior_cache = None
    if args.prior_cache is not None:
        from .prior.cache import PriorCache

        prior_cache = PriorCache(args.prior_cache)
    pairs = [p for spec in args.data for p in open_pairs(spec)]
    train_set = PairedImages(pairs, crop=args.crop, flip=True, prior_cache=prior_cache, seed=seed)
    val_set = None
    if args.val_data:
        val_pairs = [p for spec in args.val_data for p in open_pairs(spec)][:args.val_limit]
        val_set = PairedImages(val_pairs, crop=None, flip=False, prior_cache=prior_cache)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "run.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v
                                                   for k, v in vars(args).items() if not k.startswith("_")},
                                                  indent=2, default=str))
    summary = fit(model, train_set, args.out, opts, default_device(args.device), val_set, args.resume, args.progress)
    print(f"trained {summary['steps']} steps ({summary['epoch']} epochs) in {summary['seconds']:.1f} s; "
          f"weights in {args.out / 'weights'}")
    return 0
