"""``m2restore train --data ... --out RUN_DIR``: train M2Restore with the paper's recipe (see
:mod:`m2restore.train` for the defaults and what RUN_DIR holds).

``torchrun --nproc_per_node N -m m2restore train ...`` trains data-parallel on N processes with
the same flags; ``--batch-size`` is the global batch (see :mod:`m2restore.distributed`)."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..options import CHECKPOINT, DIST_TIMEOUT, TRAIN_CROP, TrainOptions
from .common import (add_backend_argument, add_device_argument, check_at_least, check_device_name, check_output,
                     check_paired_data, check_path, device_from_args)
from .errors import CliError, UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainOptions()
    parser.add_argument("--data", nargs="+", required=True, metavar="PATH",
                        help="training data: All-weather list files and/or folders with input/ and gt/")
    parser.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, logs, weights)")
    parser.add_argument("--val-data", nargs="*", default=(), metavar="PATH", help="validation data (whole images)")
    parser.add_argument("--val-limit", type=int, default=None, help="validate on at most this many images")
    parser.add_argument("--config", default="paper", help="tiny, paper or a JSON file of M2RestoreConfig fields")
    add_backend_argument(parser)
    parser.add_argument("--prior-checkpoint", type=Path, default=None, help="DA-CLIP checkpoint (default: no prior)")
    parser.add_argument("--prior-cache", type=Path, default=None, help="precomputed priors (m2restore prior-cache)")
    parser.add_argument("--crop", type=int, default=TRAIN_CROP)
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--batch-size", type=int, default=d.batch_size,
                        help="global batch: with N processes (torchrun) each takes batch-size / N images")
    parser.add_argument("--accum", type=int, default=d.accum, help="batches per optimizer step")
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--min-lr", type=float, default=d.min_lr)
    parser.add_argument("--schedule", choices=("cosine", "constant"), default=d.schedule)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--workers", type=int, default=d.workers, help="data loader processes")
    parser.add_argument("--ckpt-every", type=int, default=d.ckpt_every, help="steps between checkpoints (0: per epoch)")
    parser.add_argument("--val-every", type=int, default=d.val_every, help="epochs between validations")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    add_device_argument(parser)
    parser.add_argument("--no-amp", dest="amp", action="store_false",
                        help="no autocast on CUDA (default there: bf16 autocast, float32 weights)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training forward and backward")
    parser.add_argument("--dist-timeout", type=float, default=DIST_TIMEOUT, metavar="SECONDS",
                        help="under torchrun: how long a process waits for the others before the job stops "
                             "with an error")
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def run(args: argparse.Namespace) -> int:
    _check(args)
    from .. import distributed

    world = distributed.env_world_size()
    device = distributed.init(device_from_args(args.device), args.dist_timeout)
    try:
        summary = _train(args, device)
    except (RuntimeError, ConnectionError) as err:
        if not distributed.active() or not _collective_failure(err):
            raise
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CliError(f"process {distributed.rank()} of {world} stopped: another process exited or did not answer "
                       f"within --dist-timeout {args.dist_timeout:g} s ({first_line})") from err
    distributed.cleanup()
    if summary["rank"] == 0:
        peaks = ", ".join(f"{p:.2f}" for p in summary["peak_mem_gib"])
        print(f"trained {summary['steps']} steps ({summary['epoch']} epochs) on {world} process(es) in "
              f"{summary['seconds']:.1f} s; weights in {args.out / 'weights'}"
              + (f"; peak memory per process {peaks} GiB" if peaks else ""))
    return 0


def _check(args: argparse.Namespace) -> None:
    """Paths and option values, before torch is imported."""
    check_paired_data(args.data, "--data")
    check_paired_data(args.val_data, "--val-data")
    check_output(args.out, "--out")
    if args.config not in ("tiny", "paper"):
        check_path(Path(args.config), "--config (tiny, paper or a JSON file)", "file")
    for option, path in (("--prior-checkpoint", args.prior_checkpoint), ("--prior-cache", args.prior_cache)):
        if path is not None:
            check_path(path, option, "file")
    if args.resume:
        check_path(args.out / CHECKPOINT, "--resume: the checkpoint", "file")
    check_device_name(args.device)
    check_at_least(args, crop=1, val_limit=1, workers=0, max_steps=1)
    try:
        TrainOptions(epochs=args.epochs, batch_size=args.batch_size, accum=args.accum, schedule=args.schedule,
                     ckpt_every=args.ckpt_every, val_every=args.val_every)
    except ValueError as e:  # names the field as the option's dest: batch_size is --batch-size
        raise UsageError(f"--{str(e).replace('_', '-')}") from e
    world = int(os.environ.get("WORLD_SIZE", "1"))  # distributed.env_world_size, without importing torch
    if args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} is the global batch and must divide among the {world} "
                         f"processes torchrun started; use a multiple of {world}")
    if args.dist_timeout <= 0:
        raise UsageError(f"--dist-timeout must be positive, got {args.dist_timeout}")


def _collective_failure(err: BaseException) -> bool:
    """Whether ``err`` is a collective that failed because a peer died or timed out."""
    import torch.distributed as dist

    if isinstance(err, (dist.DistError, ConnectionError)):
        return True
    # gloo reports a peer's death as a plain RuntimeError naming its transport.
    text = str(err).lower()
    return any(word in text for word in ("gloo", "nccl", "connection reset", "connection closed"))


def _train(args: argparse.Namespace, device) -> dict:
    from .. import distributed
    from ..data import PairedImages, open_pairs
    from ..train import build_model, fit, load_checkpoint, seed_everything

    lead = distributed.is_main()
    opts = TrainOptions(epochs=args.epochs, batch_size=args.batch_size, accum=args.accum, lr=args.lr,
                        min_lr=args.min_lr, schedule=args.schedule, seed=args.seed, workers=args.workers,
                        ckpt_every=args.ckpt_every, val_every=args.val_every, max_steps=args.max_steps,
                        amp=args.amp, compile=args.compile)
    config = args.config
    if args.resume:
        ckpt = load_checkpoint(args.out / CHECKPOINT)
        config, seed = ckpt["config"], ckpt["options"]["seed"]
        del ckpt
    else:
        seed = opts.seed
    seed_everything(seed)
    model = build_model(config, args.backend, args.prior_checkpoint, quiet=args.prior_cache is not None or not lead)
    prior_cache = None
    if args.prior_cache is not None:
        from ..prior.cache import PriorCache

        prior_cache = PriorCache(args.prior_cache)
        cfg = model.config
        wanted = (cfg.prior_preprocess, cfg.input_range, cfg.prior_fp16_text)
        if (prior_cache.preprocessing, prior_cache.input_range, prior_cache.fp16_text) != wanted:
            raise UsageError(f"--prior-cache {args.prior_cache} holds priors of images prepared with "
                             f"{prior_cache.preprocessing!r} in the input range {prior_cache.input_range} "
                             f"(fp16 text: {prior_cache.fp16_text}); the model needs {wanted[0]!r} in {wanted[1]} "
                             f"(fp16 text: {wanted[2]}): rewrite it with m2restore prior-cache --preprocess {wanted[0]} "
                             f"--input-range {','.join(f'{v:g}' for v in wanted[1])}" + " --fp16-text" * wanted[2])
    pairs = [p for spec in args.data for p in open_pairs(spec)]
    train_set = PairedImages(pairs, crop=args.crop, flip=True, prior_cache=prior_cache, seed=seed)
    val_set = None
    if args.val_data:
        val_pairs = [p for spec in args.val_data for p in open_pairs(spec)][:args.val_limit]
        val_set = PairedImages(val_pairs, crop=None, flip=False, prior_cache=prior_cache)
    args.out.mkdir(parents=True, exist_ok=True)
    if lead:
        (args.out / "run.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v
                                                       for k, v in vars(args).items() if not k.startswith("_")},
                                                      indent=2, default=str))
    return {**fit(model, train_set, args.out, opts, device, val_set, args.resume, args.progress),
            "rank": distributed.rank()}
