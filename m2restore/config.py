"""Every number of the M2Restore network, in one dataclass (SPEC §1).

``M2RestoreConfig.paper()`` is the network of the paper; ``M2RestoreConfig.tiny()`` keeps its
structure with few channels and blocks, for tests and demos. Levels are numbered 1..3 from the full
resolution down; per-level tuples are ordered (level 1, level 2, level 3).

Where the paper and the authors' public code disagree, the paper is the default and the public code
is reachable through a switch:

=================  =====================  ==========================================
field              paper (default)        public code
=================  =====================  ==========================================
combine            ``"sum"``              ``"logsumexp"`` (log Σ g·exp(E(x)))
noise_mask         ``True`` (ε~Bern(½))   ``False`` (noise on every expert)
alpha              ``"vector"`` (N,)      ``"scalar"``
gate_weights_cnn   ``True`` (G·cnn)       ``False`` (G·mamba)
=================  =====================  ==========================================
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

MODEL_BACKENDS = ("auto", "triton", "torch", "reference")
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
    backend: str = "auto"
    # Whether the weights were trained with a degradation prior (DA-CLIP): only then does running
    # them without one lose a signal the network learned to use (M2Restore warns).
    trained_with_prior: bool = True

    def __post_init__(self):
        for name in ("enc_blocks", "dec_blocks", "heads", "degradation_names"):
            setattr(self, name, tuple(getattr(self, name)))
        for name in ("enc_blocks", "dec_blocks", "heads"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name} needs one entry per level (3), got {getattr(self, name)}")
        if self.backend not in MODEL_BACKENDS:
            raise ValueError(f"backend must be one of {MODEL_BACKENDS}, got {self.backend!r}")
        if self.combine not in ("sum", "logsumexp"):
            raise ValueError(f"combine must be 'sum' or 'logsumexp', got {self.combine!r}")
        if self.alpha not in ("vector", "scalar"):
            raise ValueError(f"alpha must be 'vector' or 'scalar', got {self.alpha!r}")
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
        return cls(**data)
