"""Every number of the M2Restore network, in one dataclass (docs/design.md#network-defaults).

``M2RestoreConfig.paper()`` is the network of the paper; ``M2RestoreConfig.tiny()`` keeps its
structure with few channels and blocks, for tests and demos. Levels are numbered 1..3 from the full
resolution down; per-level tuples are ordered (level 1, level 2, level 3).

Where the paper and the authors' public code disagree (or the paper is silent), the default is the
paper's reading, or the one that trains, and the public code is reachable through a switch (docs/design.md#paper-vs-public-code);
``M2RestoreConfig.authors()`` sets every one of them:

=================  ==================================  ==========================================
field              default                             ``authors()`` (public code)
=================  ==================================  ==========================================
combine            ``"sum"``: x + Σ g·E(x)             ``"logsumexp"``: x + log Σ g·exp(E(x))
noise_mask         ``True``: ε ~ Bernoulli(½)          ``False``: noise on every expert
alpha              ``"vector"``: α of shape (N,)       ``"scalar"``: one α
gate_weights_cnn   ``True``: G·cnn + (1−G)·mamba       ``False``: G·mamba + (1−G)·cnn
aflb_box           ``"half"``: n = int(t·h/2)          ``"adair"``: n = int((h//128)·t), empty for
                                                       every map under 256 pixels
balance_load       ``"smooth"``: Σ_p P(expert in the   ``"smooth_clean"``: the same with the
                   top K under the routing noise)      clean logits x_p W_g, without α·(d_g W_b + b_b)
prior_preprocess   ``"daclip"``: bicubic shorter side  ``"bilinear"``: bilinear shorter side to
                   to 224, centre crop, OpenAI         224, centre crop, no mean/std
                   mean/std (DA-CLIP's own)
input_range        ``(0, 1)``: the network sees the    ``(-1, 1)``: their loaders'
                   image as read                       ``Normalize(0.5, 0.5)`` of the input only
prior_fp16_text    ``False``: DA-CLIP's text features  ``True``: both in float16, as under their
                   and similarity in float32           CUDA autocast
=================  ==================================  ==========================================

``input_range`` is where the network's input lives; callers always pass images in [0, 1] and
:func:`to_input_range` maps them, once, in :meth:`M2Restore.network_input
<m2restore.model.M2Restore.network_input>` (and for a prior cache in
:func:`~m2restore.prior.cache.write_prior_cache`). The output is not mapped back: the residual
``output + input`` is trained against a [0, 1] ground truth in either case
(docs/design.md#input-range).

``balance_load="count"`` (#pixels routed to each expert, no gradient) is what configs saved before
the field existed used; :meth:`from_dict` fills it in for them. The load term is a count in eval mode
whatever the setting (there is no noise to average over); the authors' code does the same.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_BACKENDS = ("auto", "triton", "torch", "reference")
# The two files of a weights folder (M2Restore.save_pretrained): this config as JSON, and the tensors.
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
AFLB_BOXES = ("half", "adair")
BALANCE_LOADS = ("smooth", "smooth_clean", "count")
PRIOR_PREPROCESSING = ("daclip", "bilinear")
# What configs saved before these fields existed ran with.
_LEGACY_DEFAULTS = {"aflb_box": "half", "balance_load": "count", "prior_preprocess": "daclip"}
#: ``input_range`` of the paper and of configs saved before the field existed: images as read.
UNIT_RANGE = (0.0, 1.0)
DEGRADATIONS = ("hazy", "noisy", "raindrop", "rainy", "shadowed", "snowy")


@dataclass
class M2RestoreConfig:
    # Backbone (Restormer levels): channels dim·2^(l-1) at level l, latent dim·8.
    dim: int = 48
    enc_blocks: tuple[int, int, int] = (4, 6, 6)
    latent_blocks: int = 8
    dec_blocks: tuple[int, int, int] = (4, 6, 6)
    refinement_blocks: int = 4
    heads: tuple[int, int, int] = (1, 2, 4)  # MDTA heads per level; refinement uses level 1's
    ffn_expansion_factor: float = 2.66
    bias: bool = False  # convolutions of the transformer blocks and AFLB attention
    layernorm_eps: float = 1e-5
    pad_multiple: int = 8  # three 2× downsamplings

    # TPGS task prompt: convs 3→hidden (k3, s3, twice) then 1×1s to prompt_len, library prompt_len×prompt_dim.
    prompt_hidden: int = 64
    prompt_len: int = 32
    prompt_dim: int = 256
    prompt_leaky_slope: float = 0.1

    # DDER: pixel-wise noisy top-K mixture of experts.
    num_experts: int = 6
    top_k: int = 2
    expert_ratio: float = 2.66  # expert hidden width int(ratio·C)
    alpha_init: float = 0.5
    noise_floor: float = 0.01  # σ = softplus(x_p W_n) + noise_floor
    noise_keep_prob: float = 0.5  # ε ~ Bernoulli(noise_keep_prob)
    balance_eps: float = 1e-10
    balance_weight: float = 0.01  # λ of L1 + λ Σ balance

    # MCDB: Mamba branch + CNN branch + DGF gate fed by the prior's P_f.
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    dgf_prompt_ratio: int = 4  # prompt MLP 512 → ratio·C → C

    # AFLB (AdaIR's frequency block).
    aflb_heads: int = 4
    aflb_rate_reduction: int = 8  # threshold MLP C → C/8 → 2
    aflb_channel_reduction: int = 16  # channel gate MLP C → C/16 → C
    aflb_spatial_kernel: int = 7

    # Degradation prior (DA-CLIP): d_g over these names, P_f of prior_dim.
    degradation_names: tuple[str, ...] = DEGRADATIONS
    prior_dim: int = 512

    # Paper / public-code switches (module docstring) and the kernel backend.
    combine: str = "sum"
    noise_mask: bool = True
    alpha: str = "vector"
    gate_weights_cnn: bool = True
    aflb_box: str = "half"
    balance_load: str = "smooth"
    prior_preprocess: str = "daclip"
    input_range: tuple[float, float] = UNIT_RANGE
    prior_fp16_text: bool = False
    backend: str = "auto"
    # Whether the weights were trained with a degradation prior (DA-CLIP): only then does running
    # them without one lose a signal the network learned to use (M2Restore warns).
    trained_with_prior: bool = True

    def __post_init__(self):
        for name in ("enc_blocks", "dec_blocks", "heads", "degradation_names"):
            setattr(self, name, tuple(getattr(self, name)))
        self.input_range = check_input_range(self.input_range)
        for name in ("enc_blocks", "dec_blocks", "heads"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name} needs one entry per level (3), got {getattr(self, name)}")
        if self.backend not in MODEL_BACKENDS:
            raise ValueError(f"backend must be one of {MODEL_BACKENDS}, got {self.backend!r}")
        if self.combine not in ("sum", "logsumexp"):
            raise ValueError(f"combine must be 'sum' or 'logsumexp', got {self.combine!r}")
        if self.alpha not in ("vector", "scalar"):
            raise ValueError(f"alpha must be 'vector' or 'scalar', got {self.alpha!r}")
        for name, allowed in (("aflb_box", AFLB_BOXES), ("balance_load", BALANCE_LOADS),
                              ("prior_preprocess", PRIOR_PREPROCESSING)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.prior_preprocess == "daclip" and self.input_range != UNIT_RANGE:
            raise ValueError(f"prior_preprocess='daclip' is DA-CLIP's own transform of [0, 1] images; with "
                             f"input_range={self.input_range} use prior_preprocess='bilinear'")
        if not 1 <= self.top_k <= self.num_experts or self.num_experts < 2:
            raise ValueError(f"need 2 <= num_experts and 1 <= top_k <= num_experts, "
                             f"got num_experts={self.num_experts}, top_k={self.top_k}")
        if not self.degradation_names:
            raise ValueError("degradation_names must not be empty")
        for level, heads in enumerate(self.heads, 1):
            if self.channels(level) % heads:
                raise ValueError(f"level {level}: {self.channels(level)} channels do not split into {heads} heads")
        for level in (1, 2, 3):
            if self.aflb_channels(level) % self.aflb_heads:
                raise ValueError(f"AFLB of level {level}: {self.aflb_channels(level)} channels do not split "
                                 f"into aflb_heads={self.aflb_heads}")

    # Channel widths, derived (not fields).
    def channels(self, level: int) -> int:
        """Width of encoder level ``level`` (1..3); the latent is level 4."""
        return self.dim * 2 ** (level - 1)

    def decoder_channels(self, level: int) -> int:
        """Width of decoder level ``level``: level 1 keeps the 2·dim of [up ; skip] (no reduce)."""
        return self.channels(level) if level > 1 else 2 * self.dim

    def aflb_channels(self, level: int) -> int:
        """Width of the features entering decoder level ``level`` (latent for 3)."""
        return self.channels(level + 1)

    @property
    def num_degradations(self) -> int:
        return len(self.degradation_names)

    # Presets.
    @classmethod
    def paper(cls, **overrides) -> "M2RestoreConfig":
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> "M2RestoreConfig":
        """Same structure, dim 8 and one block per stage: a 64×64 forward in well under a second."""
        base = dict(dim=8, enc_blocks=(1, 1, 1), latent_blocks=1, dec_blocks=(1, 1, 1),
                    refinement_blocks=1, prompt_hidden=16, prompt_len=8, prompt_dim=32)
        return cls(**{**base, **overrides})

    @classmethod
    def authors(cls, **overrides) -> "M2RestoreConfig":
        """The paper's sizes with every public-code variant of the module docstring's table: the
        network the authors' training code builds (``m2restore convert-authors`` loads its weights)."""
        base = dict(combine="logsumexp", noise_mask=False, alpha="scalar", gate_weights_cnn=False,
                    aflb_box="adair", balance_load="smooth_clean", prior_preprocess="bilinear",
                    input_range=(-1.0, 1.0), prior_fp16_text=True)
        return cls(**{**base, **overrides})

    # JSON round trip.
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "M2RestoreConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown M2RestoreConfig fields: {unknown}")
        # A field missing from a saved config takes the value the config was saved with, which for
        # the switches added later is not always today's default.
        return cls(**{**{k: v for k, v in _LEGACY_DEFAULTS.items() if k not in data}, **data})


def check_input_range(value) -> tuple[float, float]:
    """``value`` (two numbers, low < high) as a tuple of floats, else ``ValueError``."""
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"input_range must be two numbers (low, high), got {value!r}") from None
    if not low < high:
        raise ValueError(f"input_range must have low < high, got {value!r}")
    return low, high


def to_input_range(images, input_range: tuple[float, float]):
    """Images in [0, 1] (a tensor of any shape and float dtype) -> the same affinely mapped onto
    ``input_range``: ``low + (high - low) · x`` (``2x − 1`` for (-1, 1), which is bit for bit the
    ``(x − 0.5) / 0.5`` of torchvision's ``Normalize(0.5, 0.5)``). The unit range returns ``images``
    itself, so configs without the field compute exactly as before."""
    low, high = input_range
    if (low, high) == UNIT_RANGE:
        return images
    return images * (high - low) + low


def saved_config(weights: str | Path) -> M2RestoreConfig:
    """The config of a weights folder (:meth:`M2Restore.save_pretrained`), read without torch;
    FileNotFoundError naming the folder when it does not hold both files."""
    from .assets import DEMO_WEIGHTS

    weights = Path(weights)
    if not (weights / WEIGHTS_NAME).is_file() or not (weights / CONFIG_NAME).is_file():
        hint = "; train them with `m2restore demo --train` or pass --weights" if weights.resolve() == DEMO_WEIGHTS else ""
        raise FileNotFoundError(f"{weights} must hold {CONFIG_NAME} and {WEIGHTS_NAME}{hint}")
    return M2RestoreConfig.from_dict(json.loads((weights / CONFIG_NAME).read_text()))
