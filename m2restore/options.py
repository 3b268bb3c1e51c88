"""The defaults and choices of the library's runs that the command line offers and shows.

A module without torch or numpy, so that ``m2restore COMMAND --help`` and argument errors answer at
once; the modules that run with these values (:mod:`m2restore.train`, :mod:`m2restore.demo`,
:mod:`m2restore.precision`, ...) import them from here.
"""
from __future__ import annotations

from dataclasses import dataclass

# ------------------------------------------------------------------------ precision
#: ``--dtype auto``: the precision :func:`m2restore.precision.resolve_precision` picks for the device.
AUTO = "auto"
#: The precisions the network runs at, by name (the keys of :data:`m2restore.precision.PRECISIONS`).
PRECISION_NAMES = ("fp32", "bf16", "fp16")
#: What ``--dtype`` accepts: a precision by name, or ``auto``.
PRECISION_CHOICES = (AUTO, *PRECISION_NAMES)
#: The narrowest network (``M2RestoreConfig.dim``) that ``auto`` runs in bf16 on a CPU with native
#: bf16: between the measured dim 8 (no gain) and dim 48 (1.4× faster), see :mod:`m2restore.precision`.
CPU_BF16_MIN_DIM = 32

# ------------------------------------------------------------------------ tiling
#: Gathering passes over the tiles before the output pass (:func:`m2restore.restore.restore_tensor`,
#: docs/design.md#tiling); the tiled and whole outputs are compared in bench/RESULTS.md (tiling).
DEFAULT_STAT_PASSES = 2

# ------------------------------------------------------------------------ memory sizes (--max-memory)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes in ``"3G"``, ``"512M"``, ``"1.5GB"``, ``"2048"`` (binary units K, M, G, T)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _SIZE_UNITS and not t[-1:].isdigit() else ""
    try:
        value = float(t[:len(t) - len(unit)])
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a memory size; write e.g. 3G or 512M") from None
    if value <= 0:
        raise ValueError(f"memory size must be positive, got {text!r}")
    return int(value * _SIZE_UNITS[unit])

# ------------------------------------------------------------------------ training
TRAIN_CROP = 224  # side of the random training crops (paper §IV-A)
CHECKPOINT = "checkpoint.pt"  # the file in a run folder that --resume continues from
DIST_TIMEOUT = 1800.0  # seconds a collective may wait for the other processes (validation included)


@dataclass
class TrainOptions:
    """How to train (:func:`m2restore.train.fit`). A *step* is one optimizer update (``accum``
    batches of ``batch_size``)."""

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
    compile: bool = False  # torch.compile the model's forward and backward

    def __post_init__(self):
        for name in ("epochs", "batch_size", "accum", "val_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.ckpt_every < 0:
            raise ValueError(f"ckpt_every must be non-negative, got {self.ckpt_every}")


# ------------------------------------------------------------------------ the demo model
# Defaults of the demo training run (m2restore.demo): small crops and a high peak rate, so that a
# CPU makes visible progress in minutes; the rate decays by a cosine to 1/DEMO_LR_DECAY of its peak.
DEMO_CROP, DEMO_BATCH_SIZE, DEMO_LR, DEMO_LR_DECAY = 64, 4, 2e-3, 100

# ------------------------------------------------------------------------ priors and analysis
# Images per CLIP forward of the prior cache: ViT-B/32 at 224² fills a GPU with a few dozen, and
# stays small on a CPU.
PRIOR_BATCH_SIZE = 32
ROUTING_PERPLEXITY = 30.0  # the paper's t-SNE perplexity for Fig. 8

# ------------------------------------------------------------------------ evaluation
#: How ``m2restore eval`` scores the Y row (:func:`m2restore.evaluate.evaluate_set`): ``ycbcr``
#: the paper's protocol, ``chw-view`` the authors' ``val_utils.py`` (:func:`m2restore.evaluate.chw_view_metrics`).
Y_METRICS = ("ycbcr", "chw-view")
