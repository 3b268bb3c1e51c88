"""M2Restore (paper Fig. 2), top to bottom.

    image (B, 3, H, W) in [0, 1], mapped onto config.input_range, padded to a multiple of 8
      ├─ degradation prior (frozen DA-CLIP, once per image) ─> d_g (B, D), P_f (B, 512)
      ├─ TPGS task prompt (once per image) ─────────────────> T (B, 256)
      └─ patch embed conv3×3 3→48
         encoder level l = 1, 2, 3:  DDER(T, d_g) → transformer blocks ─(skip)─> down
         latent:                     MCDB(P_f) × 8 at 384 channels
         decoder level l = 3, 2, 1:  AFLB(image) → up → cat skip → 1×1 reduce (not at level 1)
                                     → transformer blocks
         refinement transformer blocks → conv3×3 96→3 → + image → crop to H×W

Channel widths and block counts come from ``M2RestoreConfig`` (``paper()`` is the table of docs/design.md#network-defaults).
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import CONFIG_NAME, WEIGHTS_NAME, M2RestoreConfig, to_input_range  # noqa: F401 - the file names: this module's API too
from .modules import AFLB, DDER, MCDB, Downsample, TaskPrompt, TransformerBlock, Upsample
from .modules.statistics import whole_map
from .prior.null import DegradationPrior, NullPrior

#: Names ``M2Restore.from_pretrained`` accepts beside folders: weights shipped with the package.
PRETRAINED = ("demo",)


def pretrained_path(name_or_dir: str | Path) -> Path:
    """The weights folder of a :data:`PRETRAINED` name (unless a folder of that name exists), else
    ``name_or_dir`` as a path."""
    if str(name_or_dir) in PRETRAINED and not Path(name_or_dir).is_dir():
        from .restore import DEMO_WEIGHTS

        return DEMO_WEIGHTS
    return Path(name_or_dir)


@dataclass
class M2RestoreAux:
    """What ``model(x, return_aux=True)`` returns beside the image.

    balance_loss: scalar, the balance losses of the three DDERs summed (the λ term of the loss).
    routing: one (B, N, H_l, W_l) tensor per DDER (levels 1, 2, 3), the dense per-pixel gate
    weights (zero for unselected experts), at the padded resolution of the level.
    """

    balance_loss: torch.Tensor
    routing: list[torch.Tensor]


def _blocks(config: M2RestoreConfig, dim: int, heads: int, count: int) -> nn.Sequential:
    return nn.Sequential(*[
        TransformerBlock(dim, heads, config.ffn_expansion_factor, config.bias, config.layernorm_eps)
        for _ in range(count)
    ])


class EncoderLevel(nn.Module):
    """DDER, transformer blocks (their output is the skip), downsample."""

    def __init__(self, config: M2RestoreConfig, level: int):
        super().__init__()
        dim = config.channels(level)
        self.dder = DDER(dim, config)
        self.blocks = _blocks(config, dim, config.heads[level - 1], config.enc_blocks[level - 1])
        self.down = Downsample(dim)


class DecoderLevel(nn.Module):
    """AFLB on the incoming features, upsample, concatenate the skip, 1×1 reduce, transformer blocks."""

    def __init__(self, config: M2RestoreConfig, level: int):
        super().__init__()
        incoming, dim = config.aflb_channels(level), config.decoder_channels(level)
        self.aflb = AFLB(incoming, config.aflb_heads, config.bias, config.aflb_rate_reduction,
                         config.aflb_channel_reduction, config.aflb_spatial_kernel, config.aflb_box)
        self.up = Upsample(incoming)
        # [up ; skip] has `incoming` channels; level 1 keeps them all (Restormer's layout).
        self.reduce = nn.Conv2d(incoming, dim, 1, bias=config.bias) if level > 1 else nn.Identity()
        self.blocks = _blocks(config, dim, config.heads[level - 1], config.dec_blocks[level - 1])


class M2Restore(nn.Module):
    """The network. ``prior`` is any ``DegradationPrior``; a DA-CLIP prior stays frozen and outside
    ``state_dict()``/``parameters()``, but moves with ``model.to(...)``. Without one, ``NullPrior``
    (with a warning when ``config.trained_with_prior``: the network then misses a learned input)."""

    def __init__(self, config: M2RestoreConfig | None = None, prior: DegradationPrior | None = None):
        super().__init__()
        self.config = config = config or M2RestoreConfig.paper()
        if prior is None and config.trained_with_prior:
            warnings.warn(
                "M2Restore has no degradation prior: using NullPrior (uniform d_g, zero P_f), so the DDER "
                "routing bias and the DGF prompt carry no signal. Pass prior=DAClipPrior(...) (or a "
                "precomputed prior=(d_g, P_f) to forward) for a model trained with DA-CLIP.",
                stacklevel=2,
            )
        if prior is None:
            prior = NullPrior(config.num_degradations, config.prior_dim)
        self.set_prior(prior)

        self.task_prompt = TaskPrompt(config.prompt_hidden, config.prompt_len, config.prompt_dim,
                                      config.prompt_leaky_slope)
        self.patch_embed = nn.Conv2d(3, config.dim, 3, padding=1, bias=False)
        self.encoder = nn.ModuleList(EncoderLevel(config, level) for level in (1, 2, 3))
        self.latent = nn.ModuleList(MCDB(config.channels(4), config) for _ in range(config.latent_blocks))
        self.decoder = nn.ModuleList(DecoderLevel(config, level) for level in (1, 2, 3))
        self.refinement = _blocks(config, config.decoder_channels(1), config.heads[0], config.refinement_blocks)
        self.output = nn.Conv2d(config.decoder_channels(1), 3, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor, prior: tuple[torch.Tensor, torch.Tensor] | None = None,
                return_aux: bool = False, *, task_prompt: torch.Tensor | None = None):
        """x (B, 3, H, W) float in [0, 1], any H, W >= 1 -> restored (B, 3, H, W) [, M2RestoreAux],
        in [0, 1] (unclamped) whatever ``config.input_range`` the network sees (:meth:`network_input`).

        ``prior=(d_g (B, D), P_f (B, prior_dim))`` skips the prior module (e.g. cached DA-CLIP outputs);
        ``task_prompt`` (B, prompt_dim) skips the TPGS (a tile gets its whole image's, as it does the prior).
        """
        self._check_input(x)
        h, w = x.shape[-2:]
        mapped = self.network_input(x)
        d_g, p_f = self._degradation_prior(mapped, prior)
        image = self._pad(mapped)
        if task_prompt is None:
            task_prompt = self.task_prompt(image)
        feats = self.patch_embed(image)

        skips, balances, routing = [], [], []
        for level in self.encoder:
            feats, balance, gates = level.dder(feats, task_prompt, d_g)
            feats = level.blocks(feats)
            skips.append(feats)
            feats = level.down(feats)
            balances.append(balance)
            routing.append(gates)

        feats = whole_map(feats, lambda bottleneck: self.latent_stage(bottleneck, p_f))

        for level, skip in zip(reversed(self.decoder), reversed(skips)):
            feats = level.aflb(image, feats)
            feats = level.reduce(torch.cat([level.up(feats), skip], dim=1))
            feats = level.blocks(feats)

        feats = self.refinement(feats)
        restored = (self.output(feats) + image)[:, :, :h, :w]
        if return_aux:
            return restored, M2RestoreAux(torch.stack(balances).sum(), routing)
        return restored

    def network_input(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) in [0, 1] -> what the network computes on: x mapped onto
        ``config.input_range`` by :func:`~m2restore.config.to_input_range` (x itself for [0, 1]).
        The one place the input range is applied: the prior reads this tensor, and the task prompt,
        the patch embedding, the AFLBs and the output residual read it padded."""
        return to_input_range(x, self.config.input_range)

    def shared_inputs(self, x: torch.Tensor, prior: tuple[torch.Tensor, torch.Tensor] | None = None
                      ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """What every tile of x (B, 3, H, W) in [0, 1] gets from the whole image, to pass to
        :meth:`forward` as ``prior`` and ``task_prompt``: ((d_g (B, D), P_f (B, prior_dim)), task
        prompt (B, prompt_dim)). A ``prior`` given is checked and kept."""
        mapped = self.network_input(x)
        return self._degradation_prior(mapped, prior), self.task_prompt(self._pad(mapped))

    def _pad(self, image: torch.Tensor) -> torch.Tensor:
        """Replicate-pad (B, C, H, W) to multiples of ``config.pad_multiple``."""
        h, w = image.shape[-2:]
        m = self.config.pad_multiple
        return F.pad(image, (0, -w % m, 0, -h % m), mode="replicate")

    def latent_stage(self, feats: torch.Tensor, p_f: torch.Tensor) -> torch.Tensor:
        """The MCDBs, (B, C_4, H/8, W/8) -> the same. The Mamba scans run along the whole map's rows,
        so the tiles of one image share this stage (:func:`~m2restore.modules.statistics.whole_map`)."""
        for block in self.latent:
            feats = block(feats, p_f)
        return feats

    # Prior handling.
    @property
    def prior(self) -> DegradationPrior:
        return self._prior

    def set_prior(self, prior: DegradationPrior) -> None:
        if not callable(prior):
            raise TypeError(f"prior must be callable images -> (d_g, P_f), got {type(prior).__name__}")
        preprocessing = getattr(prior, "preprocessing", None)  # DAClipPrior's image preparation
        if preprocessing is not None and preprocessing != self.config.prior_preprocess:
            warnings.warn(f"the prior prepares images with {preprocessing!r} but this model's config has "
                          f"prior_preprocess={self.config.prior_preprocess!r}: its d_g and P_f differ from "
                          "those the model was trained with", stacklevel=2)
        fp16_text = getattr(prior, "fp16_text", None)
        if fp16_text is not None and fp16_text != self.config.prior_fp16_text:
            warnings.warn(f"the prior computes its text side with fp16_text={fp16_text} but this model's config has "
                          f"prior_fp16_text={self.config.prior_fp16_text}: its d_g differs (~1e-3) from the one the "
                          "model was trained with", stacklevel=2)
        # Bypass nn.Module registration: the frozen prior is not part of this model's weights.
        object.__setattr__(self, "_prior", prior)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if isinstance(self._prior, nn.Module):
            self._prior._apply(fn, recurse)
        return self

    def _degradation_prior(self, x: torch.Tensor, prior) -> tuple[torch.Tensor, torch.Tensor]:
        b = x.shape[0]
        if prior is None:
            with torch.no_grad():
                prior = self._prior(x)
            source = f"prior module {type(self._prior).__name__}"
        else:
            source = "prior argument"
        if not (isinstance(prior, (tuple, list)) and len(prior) == 2
                and all(isinstance(t, torch.Tensor) for t in prior)):
            raise ValueError(f"{source} must be a pair of tensors (d_g, P_f), got {type(prior).__name__}")
        d_g, p_f = prior
        expected = {"d_g": (b, self.config.num_degradations), "P_f": (b, self.config.prior_dim)}
        for name, t in (("d_g", d_g), ("P_f", p_f)):
            if tuple(t.shape) != expected[name]:
                raise ValueError(f"{source}: {name} must have shape {expected[name]} (batch {b}, "
                                 f"config), got {tuple(t.shape)}")
            if not t.is_floating_point():
                raise ValueError(f"{source}: {name} must be a floating-point tensor, got {t.dtype}")
        return d_g.to(device=x.device, dtype=x.dtype), p_f.to(device=x.device, dtype=x.dtype)

    @staticmethod
    def _check_input(x) -> None:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a torch.Tensor (B, 3, H, W), got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"x must be a 4-D tensor (B, 3, H, W), got a {x.dim()}-D tensor of shape "
                             f"{tuple(x.shape)}" + ("; add a batch dimension with x[None]" if x.dim() == 3 else ""))
        if x.shape[1] != 3:
            raise ValueError(f"x must have 3 (RGB) channels in dim 1, got {x.shape[1]} (shape {tuple(x.shape)})")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor with values in [0, 1], got dtype {x.dtype}")
        if 0 in x.shape:
            raise ValueError(f"x must be non-empty, got shape {tuple(x.shape)}")

    # Weights I/O: safetensors + JSON config, never pickle.
    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``directory/config.json`` and ``directory/model.safetensors`` (the prior is not saved)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | Path, prior: DegradationPrior | None = None,
                        prior_checkpoint: str | Path | None = None, map_location="cpu",
                        backend: str | None = None) -> "M2Restore":
        """Build the model of ``directory/config.json`` and load ``directory/model.safetensors``.

        ``directory`` may also be a name of :data:`PRETRAINED`: ``"demo"`` is the shipped demo
        weights (``tiny()``, trained without a prior on synthetic weather; see the README).
        ``prior_checkpoint``: a DA-CLIP checkpoint, loaded with ``DAClipPrior.from_checkpoint``
        (needs open_clip). ``backend`` overrides the saved config's. A checkpoint that does not fit
        the config raises ``ValueError``.
        """
        from safetensors.torch import load_file

        directory = pretrained_path(directory)
        config = M2RestoreConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
        if backend is not None:
            config = dataclasses.replace(config, backend=backend)
        if prior_checkpoint is not None:
            if prior is not None:
                raise ValueError("pass either prior or prior_checkpoint, not both")
            from .prior import DAClipPrior

            prior = DAClipPrior.from_checkpoint(prior_checkpoint, names=config.degradation_names,
                                               preprocessing=config.prior_preprocess,
                                               fp16_text=config.prior_fp16_text)
        model = cls(config, prior=prior)
        model.load_weights(load_file(str(directory / WEIGHTS_NAME)))
        return model.to(map_location)

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Load a state dict after checking it key by key against this model; the first key that is
        missing or has another shape is named in the ``ValueError``, then any unexpected keys."""
        own = self.state_dict()
        for key, tensor in own.items():
            if key not in state:
                missing = [k for k in own if k not in state]
                raise ValueError(f"checkpoint does not fit the config: missing key {key!r} "
                                 f"({len(missing)} missing in all)")
            if state[key].shape != tensor.shape:
                raise ValueError(f"checkpoint does not fit the config: key {key!r} has shape "
                                 f"{tuple(state[key].shape)} in the checkpoint, {tuple(tensor.shape)} in the model")
        unexpected = [k for k in state if k not in own]
        if unexpected:
            raise ValueError(f"checkpoint does not fit the config: unexpected key {unexpected[0]!r} "
                             f"({len(unexpected)} unexpected in all)")
        self.load_state_dict(state)
