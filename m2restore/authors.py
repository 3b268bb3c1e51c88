"""Weights trained with the authors' public code, in this package's layout.

The authors' ``M2Restore`` module names things differently: their class ``MCDB`` is the paper's
DDER (``mcdbN`` at encoder level N) and their ``MB`` the paper's MCDB (``latent.i``); their AFLBs
are ``fre1`` (level 3, on the latent), ``fre2`` (level 2) and ``fre3`` (level 1). Their
``channel_cross_l`` attends from the *high*-frequency part and ``channel_cross_h`` from the low
one, so they map by use to our ``cross_high`` and ``cross_low``. Their experts are separate
``nn.Linear`` pairs (``el.i.fc1``, ``el.i.fc2``), ours one stacked (N, in, out) tensor per layer.

Their checkpoints also hold tensors their forward never reads (``freN.conv``, ``freN.score_gen``,
the ``mcdbN.model.mean``/``std`` of the normal CDF) and the frozen DA-CLIP (``daclip.*``); these
are dropped and reported. All functions here are pure: state dicts in, state dicts out.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from .checkpoints import read_state_dict
from .config import DEGRADATIONS, M2RestoreConfig

# Wrappers whose attribute names prefix every key: DataParallel, the authors' LightningModule.
WRAPPER_PREFIXES = ("module.", "net.")

# Their tensors that our network has no place for, with the reason reported for each.
_DROPPED = (
    (re.compile(r"fre[123]\.conv\.weight$"), "a convolution their forward never uses (it reads conv1)"),
    (re.compile(r"fre[123]\.score_gen\.(weight|bias)$"), "a convolution their forward never uses"),
    (re.compile(r"mcdb[123]\.model\.(mean|std)$"), "the constant 0 / 1 of their normal CDF"),
    (re.compile(r"daclip\."), "the frozen DA-CLIP prior; load its checkpoint with --prior-checkpoint"),
)

# Ours -> theirs, tried in order on the rest of a key once the module prefix is translated.
_NORM = [(r"^(norm[12])\.", r"\1.body.")]  # their LayerNorm wraps the parameters in .body
_BLOCK = _NORM  # transformer blocks: attn.* and ffn.* keep their names
_DDER = [
    (r"^prompt_proj\.", "fc."), (r"^w_gate$", "model.w_g"), (r"^w_noise$", "model.w_n"),
    (r"^alpha$", "model.gate_boost"), (r"^degradation_proj\.", "model.degra_proj."),
]
_MCDB = _NORM + [
    (r"^mamba_norm_in\.", "ssm.norm."), (r"^mamba_norm_out\.", "ssm.norm2."), (r"^mamba\.", "ssm.mamba."),
    (r"^dgf\.dwconv\.", "ssm.conv_path.0."), (r"^dgf\.prompt_mlp\.", "ssm.prompt_proj."),
    (r"^dgf\.gate1\.", "ssm.gate_net.0."), (r"^dgf\.gate2\.", "ssm.gate_net.2."),
]
_AFLB = [
    (r"^a$", "para1"), (r"^b$", "para2"), (r"^image_conv\.", "conv1."),
    (r"^cross_high\.", "channel_cross_l."), (r"^cross_low\.", "channel_cross_h."),
    (r"^cross_agg\.", "channel_cross_agg."), (r"^refine\.spatial_gate\.conv\.", "frequency_refine.SpatialGate.spatial."),
    (r"^refine\.channel_gate\.", "frequency_refine.ChannelGate."), (r"^refine\.proj\.", "frequency_refine.proj."),
]
_EXPERTS = {"w1": ("fc1.weight", True), "b1": ("fc1.bias", False), "w2": ("fc2.weight", True), "b2": ("fc2.bias", False)}


@dataclass
class Conversion:
    """What :func:`convert_state_dict` made of a checkpoint.

    state: our state dict (the checkpoint's tensors, dtypes kept); config: the network it fits;
    sources: for each of our keys, the checkpoint keys it was made from; dropped: checkpoint key ->
    why it was left out.
    """

    state: dict[str, torch.Tensor]
    config: M2RestoreConfig
    sources: dict[str, tuple[str, ...]] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)


def strip_wrappers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without the leading ``module.`` / ``net.`` of DataParallel and the authors' Lightning module."""
    out = {}
    for key, value in state.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def _rewrite(rest: str, rules) -> str:
    for pattern, replacement in rules:
        new, n = re.subn(pattern, replacement, rest)
        if n:
            return new
    return rest


def _their_key(ours: str) -> str | Callable[[Mapping[str, torch.Tensor]], tuple[torch.Tensor, tuple[str, ...]]]:
    """The checkpoint key of one of our keys, or (for the stacked experts) a function that gathers it."""
    parts = ours.split(".")
    head, rest = parts[0], ".".join(parts[1:])
    if head == "task_prompt":
        return "task_prompt." + _rewrite(rest, [(r"^library$", "dictionary"), (r"^convs\.", "CondNet."),
                                                 (r"^weights\.", "lastOut.")])
    if head == "patch_embed":
        return "patch_embed.proj." + rest
    if head == "encoder":
        level, part, rest = int(parts[1]) + 1, parts[2], ".".join(parts[3:])
        if part == "down":
            return f"down{level}_{level + 1}.body.{rest}"
        if part == "blocks":
            i, rest = rest.split(".", 1)
            return f"encoder_level{level}.{i}." + _rewrite(rest, _BLOCK)
        if rest in _EXPERTS:
            return _experts(f"mcdb{level}.model.el", *_EXPERTS[rest])
        return f"mcdb{level}." + _rewrite(rest, _DDER)
    if head == "latent":
        i, rest = rest.split(".", 1)
        return f"latent.{i}." + _rewrite(rest, _MCDB)
    if head == "decoder":
        level, part, rest = int(parts[1]) + 1, parts[2], ".".join(parts[3:])
        if part == "aflb":
            return f"fre{4 - level}." + _rewrite(rest, _AFLB)
        if part == "up":
            return f"up{level + 1}_{level}.body.{rest}"
        if part == "reduce":
            return f"reduce_chan_level{level}.{rest}"
        i, rest = rest.split(".", 1)
        return f"decoder_level{level}.{i}." + _rewrite(rest, _BLOCK)
    if head == "refinement":
        i, rest = rest.split(".", 1)
        return f"refinement.{i}." + _rewrite(rest, _BLOCK)
    return ours  # output.*


def _experts(prefix: str, name: str, transpose: bool):
    """Gather ``prefix.i.name`` for i = 0, 1, ... into one (N, ...) tensor; nn.Linear weights (out,
    in) become our (in, out)."""

    def gather(state: Mapping[str, torch.Tensor]):
        keys = []
        while f"{prefix}.{len(keys)}.{name}" in state:
            keys.append(f"{prefix}.{len(keys)}.{name}")
        if not keys:
            raise ValueError(f"checkpoint key {prefix}.0.{name} is missing")
        tensors = [state[k].t() if transpose else state[k] for k in keys]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) != 1:
            raise ValueError(f"checkpoint keys {prefix}.*.{name}: the experts' shapes differ ({sorted(shapes)})")
        return torch.stack(tensors), tuple(keys)

    return gather


def _count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    found = {int(m.group(1)) for k in state for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m}
    return max(found) + 1 if found else 0


def _shape(state: Mapping[str, torch.Tensor], key: str) -> torch.Size:
    if key not in state:
        raise ValueError(f"checkpoint key {key} is missing: not a checkpoint of the authors' M2Restore")
    return state[key].shape


def authors_config(state: Mapping[str, torch.Tensor], **overrides) -> M2RestoreConfig:
    """``M2RestoreConfig.authors()`` with the sizes read off a checkpoint (wrappers stripped).

    Widths, block and head counts, the prompt library, the experts, Mamba's sizes and the DGF
    prompt MLP come from tensor shapes; what no shape records (``top_k``, the expansion ratios,
    the reductions) keeps the authors' values, and a checkpoint that disagrees fails the shape check
    of :func:`convert_state_dict`. ``overrides`` replace any field.
    """
    dim = _shape(state, "patch_embed.proj.weight")[0]
    blocks = {name: tuple(_count(state, f"{name}_level{level}.") for level in (1, 2, 3))
              for name in ("encoder", "decoder")}
    heads = tuple(_shape(state, f"encoder_level{level}.0.attn.temperature")[0] if blocks["encoder"][level - 1]
                  else _shape(state, f"decoder_level{level}.0.attn.temperature")[0] for level in (1, 2, 3))
    library = _shape(state, "task_prompt.dictionary")
    router = _shape(state, "mcdb1.model.w_g")
    degradations = _shape(state, "mcdb1.model.degra_proj.weight")[1]
    if degradations != len(DEGRADATIONS):
        raise ValueError(f"checkpoint key mcdb1.model.degra_proj.weight routes on {degradations} degradations; "
                         f"the authors' code uses the {len(DEGRADATIONS)} {DEGRADATIONS}: pass degradation_names")
    latent = dim * 8
    prompt_mlp = _shape(state, "latent.0.ssm.prompt_proj.0.weight")
    sizes = dict(
        dim=dim, enc_blocks=blocks["encoder"], dec_blocks=blocks["decoder"], heads=heads,
        latent_blocks=_count(state, "latent."), refinement_blocks=_count(state, "refinement."),
        bias="encoder_level1.0.attn.qkv.bias" in state or "decoder_level1.0.attn.qkv.bias" in state,
        prompt_hidden=_shape(state, "task_prompt.CondNet.0.weight")[0],
        prompt_len=library[0], prompt_dim=library[1], num_experts=router[1],
        mamba_d_state=_shape(state, "latent.0.ssm.mamba.A_log")[1],
        mamba_d_conv=_shape(state, "latent.0.ssm.mamba.conv1d.weight")[2],
        mamba_expand=_shape(state, "latent.0.ssm.mamba.in_proj.weight")[0] // (2 * latent),
        prior_dim=prompt_mlp[1], dgf_prompt_ratio=prompt_mlp[0] // latent,
        aflb_heads=_shape(state, "fre1.channel_cross_agg.temperature")[0],
    )
    return M2RestoreConfig.authors(**{**sizes, **overrides})


def dropped_reason(key: str) -> str | None:
    """Why a checkpoint key of the authors' network has no counterpart here, or None."""
    for pattern, reason in _DROPPED:
        if pattern.match(key):
            return reason
    return None


def convert_state_dict(state: Mapping[str, torch.Tensor], config: M2RestoreConfig | None = None) -> Conversion:
    """The authors' state dict (``module.``/``net.`` prefixes allowed) -> :class:`Conversion`.

    ``config`` defaults to :func:`authors_config` of the checkpoint. Every checkpoint tensor is
    either mapped or listed in ``dropped``; a missing key, a key that fits nowhere or a shape that
    differs from the network of ``config`` raises ``ValueError`` naming the checkpoint key.
    """
    from .model import M2Restore
    from .prior.null import NullPrior

    theirs = strip_wrappers(state)
    config = config or authors_config(theirs)
    shapes = {k: v.shape for k, v in
              M2Restore(config, prior=NullPrior(config.num_degradations, config.prior_dim)).state_dict().items()}
    out, sources = {}, {}
    for ours, expected in shapes.items():
        source = _their_key(ours)
        if callable(source):
            tensor, keys = source(theirs)
        else:
            if source not in theirs:
                raise ValueError(f"checkpoint key {source} is missing (our {ours})")
            tensor, keys = theirs[source], (source,)
        if tensor.shape != expected:
            raise ValueError(f"checkpoint key {keys[0] if len(keys) == 1 else keys[0].replace('.0.', '.*.')} has "
                             f"shape {tuple(tensor.shape)}, our {ours} needs {tuple(expected)} "
                             f"(config {config_summary(config)})")
        out[ours], sources[ours] = tensor, keys
    used = {k for keys in sources.values() for k in keys}
    dropped, unexpected = {}, []
    for key in theirs:
        if key in used:
            continue
        reason = dropped_reason(key)
        if reason is None:
            unexpected.append(key)
        else:
            dropped[key] = reason
    if unexpected:
        raise ValueError(f"checkpoint key {unexpected[0]} has no place in M2Restore "
                         f"({len(unexpected)} such keys in all)")
    return Conversion(out, config, sources, dropped)


def config_summary(config: M2RestoreConfig) -> str:
    """The sizes that shape the weights, in one line."""
    return (f"dim={config.dim}, blocks={config.enc_blocks}/{config.latent_blocks}/{config.dec_blocks}/"
            f"{config.refinement_blocks}, experts={config.num_experts}, prompt={config.prompt_len}x{config.prompt_dim}")


def read_authors_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in a file saved by the authors' training code, loaded with ``weights_only=True``:
    a Lightning checkpoint (``{"state_dict": ...}``) or a bare state dict. Raises ``ValueError``."""
    return read_state_dict(path, hint="; if you trust it, save its state_dict alone and convert that")
