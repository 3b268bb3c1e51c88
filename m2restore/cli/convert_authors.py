"""``m2restore convert-authors CHECKPOINT -o DIR``: weights trained with the authors' public code
(a Lightning ``.ckpt`` or a bare state dict) -> a ``save_pretrained`` folder with the
``M2RestoreConfig.authors()`` config, to run with ``--weights DIR`` on this package's kernels.

Exit status: 0 converted, 1 the checkpoint could not be read or does not fit, 2 usage."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..config import CONFIG_NAME, WEIGHTS_NAME
from .common import check_at_least, check_output, check_path
from .errors import InputError, UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="checkpoint saved by the authors' training code")
    parser.add_argument("-o", "--out", type=Path, required=True, help="folder to write config.json and model.safetensors")
    parser.add_argument("--top-k", type=int, default=None,
                        help="experts per pixel the model was trained with (not stored in checkpoints; default 2)")
    parser.add_argument("--force", action="store_true", help="overwrite a folder that already holds a model")


def run(args: argparse.Namespace) -> int:
    check_path(args.checkpoint, "checkpoint", "file")
    check_output(args.out, "--out")
    if not args.force and any((args.out / name).exists() for name in (CONFIG_NAME, WEIGHTS_NAME)):
        raise UsageError(f"{args.out} already holds a model; pass --force to overwrite it or choose another -o")
    check_at_least(args, top_k=1)

    from ..authors import authors_config, config_summary, convert_state_dict, read_authors_checkpoint, strip_wrappers
    from ..model import M2Restore
    from ..prior.null import NullPrior

    try:
        state = strip_wrappers(read_authors_checkpoint(args.checkpoint))
        overrides = {} if args.top_k is None else {"top_k": args.top_k}
        conversion = convert_state_dict(state, authors_config(state, **overrides))
    except (OSError, ValueError) as err:
        raise InputError(f"{args.checkpoint}: {err}") from err
    config = conversion.config
    model = M2Restore(config, prior=NullPrior(config.num_degradations, config.prior_dim))
    model.load_weights(conversion.state)
    model.save_pretrained(args.out)

    mapped = sum(len(keys) for keys in conversion.sources.values())
    print(f"{args.checkpoint}: {mapped} tensors mapped onto {len(conversion.state)} of ours "
          f"({config_summary(config)}, top_k={config.top_k})")
    by_reason: dict[str, list[str]] = {}
    for key, reason in conversion.dropped.items():
        by_reason.setdefault(reason, []).append(key)
    for reason, keys in by_reason.items():
        shown = keys if args.verbose else keys[:3] + (["..."] if len(keys) > 3 else [])
        print(f"dropped {len(keys)}: {reason}: {', '.join(shown)}")
    print(f"wrote {args.out / CONFIG_NAME} and {args.out / WEIGHTS_NAME} (M2RestoreConfig.authors(): the network "
          f"sees images mapped onto {config.input_range}, as their loaders normalise them); "
          "run them with the DA-CLIP checkpoint the model was trained with (--prior-checkpoint)")
    return 0
