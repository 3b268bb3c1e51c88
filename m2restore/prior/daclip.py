"""The frozen DA-CLIP degradation prior, built on pip's ``open_clip_torch``.

DA-CLIP (Luo et al., Algolzw/daclip-uir) is a CLIP plus a *controller*: a copy of the vision tower
whose transformer emits, after each residual block ``i``, ``hidden_i = zero_i(tokens_i)`` through a
zero-initialised ``Linear(width, width)``. The controller's pooled output is the degradation
embedding; the frozen CLIP vision tower adds ``hidden_{L-1-j}`` to its tokens after its own block
``j`` (the public code pops the hiddens from the end of the list) and gives the content embedding.

M2Restore uses it as ``(d_g, P_f)``:
``d_g = softmax(100 * normalize(degra_features) @ normalize(text_features(names))^T)`` (B, D) and
``P_f = image_features`` (B, embed_dim), not normalised.

The public model lives in an open_clip fork that is not on PyPI, so the injection is done here by
walking the submodules of pip's ``VisionTransformer`` (``conv1``, ``class_embedding``,
``positional_embedding``, ``ln_pre``, ``transformer.resblocks``, ``ln_post``, ``proj``).
Nothing is ever downloaded: the CLIP is built from open_clip's bundled JSON config with random
weights, and real weights come from :meth:`DAClipPrior.from_checkpoint`.
"""
from __future__ import annotations

import copy
import os
from typing import Mapping, Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transformer import VisionTransformer
from torch import nn

from ..checkpoints import read_state_dict
from ..config import DEGRADATIONS as DEFAULT_NAMES  # the six adverse-weather types M2Restore routes on

DACLIP_NAMES = (
    "motion-blurry", "hazy", "jpeg-compressed", "low-light", "noisy",
    "raindrop", "rainy", "shadowed", "snowy", "uncompleted",
)
"""The ten degradation types DA-CLIP was trained on, in the authors' order."""

PREPROCESSING = ("daclip", "bilinear")
"""The image preparations :meth:`DAClipPrior.preprocess` knows (``M2RestoreConfig.prior_preprocess``)."""

# DA-CLIP's fixed similarity scale for the degradation probabilities (not the learned logit_scale).
SIMILARITY_SCALE = 100.0

# Public checkpoint names of the controller that differ from ours: the fork wraps the copied
# transformer in a ControlTransformer (hence `.transformer.transformer`) holding `zero_modules`.
_PUBLIC_ZERO = "visual_control.transformer.zero_modules."
_PUBLIC_CONTROL_BLOCKS = "visual_control.transformer.transformer."
_OURS_ZERO = "control_zero."
_OURS_CONTROL_BLOCKS = "visual_control.transformer."
_SHOWN = 5  # keys listed per kind of checkpoint mismatch


def _merge(base: dict, override: Mapping) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _model_config(model_name: str, model_cfg: Mapping | None) -> dict:
    """open_clip's bundled config for ``model_name``, deep-merged with ``model_cfg``."""
    if model_cfg is None:
        # Only bundled names: an "hf-hub:" or other schema would make open_clip fetch.
        if model_name not in open_clip.list_models():
            raise ValueError(
                f"model_name {model_name!r} is not one of open_clip's bundled configs; "
                "pass model_cfg to describe the architecture"
            )
        base = open_clip.get_model_config(model_name)
    else:
        base = open_clip.get_model_config(model_name) if model_name in open_clip.list_models() else {}
        base = _merge(base, model_cfg)
    if base.get("custom_text") or "hf_model_name" in base.get("text_cfg", {}):
        raise ValueError(f"model {model_name!r}: DA-CLIP needs open_clip's plain CLIP text tower")
    return base


def _unit(features: torch.Tensor) -> torch.Tensor:
    """Rows divided by their float32 norm, stored in float16: ``x /= x.norm(dim=-1, keepdim=True)``
    on a float16 ``x`` under autocast (whose norm is float32)."""
    features = features.float()
    return (features / features.norm(dim=-1, keepdim=True)).half()


def _zero_linear(width: int) -> nn.Linear:
    layer = nn.Linear(width, width)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


# (ours, public) key prefixes of the controller's zero layers and of its transformer blocks.
_PREFIXES = ((_OURS_ZERO, _PUBLIC_ZERO), (_OURS_CONTROL_BLOCKS, _PUBLIC_CONTROL_BLOCKS))


def _swap_prefix(name: str, pairs) -> str:
    for old, new in pairs:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _to_public(name: str) -> str:
    return _swap_prefix(name, _PREFIXES)


def _from_public(name: str) -> str:
    return _swap_prefix(name, [(public, ours) for ours, public in _PREFIXES])


def _listing(what: str, items: Sequence[str]) -> str:
    shown = ", ".join(items[:_SHOWN]) + (", ..." if len(items) > _SHOWN else "")
    return f"{what} ({len(items)}): {shown}"


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in a DA-CLIP checkpoint file, loaded with ``weights_only=True``.

    Accepts a bare state dict or one under ``"state_dict"`` (the training script's layout), and
    strips DataParallel's ``module.`` prefixes. Raises ``ValueError`` for anything else.
    """
    state = read_state_dict(path)
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


class DAClipPrior(nn.Module):
    """Frozen DA-CLIP: images (B, 3, H, W) in [0, 1] -> ``(d_g (B, D), P_f (B, embed_dim))``.

    Args:
        model_name: an open_clip bundled config name (DA-CLIP uses ``"ViT-B-32"``: embed 512, vision
            width 768, 12 layers, patch 32, image 224). Weights are random until loaded.
        names: the degradation names; ``D = len(names)``. :data:`DEFAULT_NAMES` by default,
            :data:`DACLIP_NAMES` for DA-CLIP's own ten.
        model_cfg: a dict deep-merged over the named open_clip config (e.g. a tiny model in tests).
        preprocessing: how :meth:`preprocess` prepares images, one of :data:`PREPROCESSING`:
            ``"daclip"`` (DA-CLIP's own eval transform) or ``"bilinear"`` (the M2Restore authors'
            code: bilinear shorter side, centre crop, no mean/std). A model must run with the one
            it was trained with (``M2RestoreConfig.prior_preprocess``).
        fp16_text: compute the text features and the similarity ``100 · degra @ textᵀ`` in float16
            (autocast on the prior's device, normalised in float32 and stored in float16), as the
            M2Restore authors' code does under CUDA autocast (``M2RestoreConfig.prior_fp16_text``);
            ``False``: float32.

    Submodules: ``clip`` (an ``open_clip.model.CLIP``), ``visual_control`` (a deep copy of
    ``clip.visual``) and ``control_zero`` (one ``Linear(width, width)`` per residual block, zero at
    construction). Every parameter is frozen and the module stays in eval mode.
    Outputs are float32; on CUDA the towers run under float16 autocast.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        names: Sequence[str] = DEFAULT_NAMES,
        model_cfg: Mapping | None = None,
        preprocessing: str = "daclip",
        fp16_text: bool = False,
    ):
        super().__init__()
        if preprocessing not in PREPROCESSING:
            raise ValueError(f"preprocessing must be one of {PREPROCESSING}, got {preprocessing!r}")
        self.preprocessing = preprocessing
        self.fp16_text = fp16_text
        self.model_name = model_name
        self.model_cfg = _model_config(model_name, model_cfg)
        self.clip = open_clip.model.CLIP(**self.model_cfg)
        visual = self.clip.visual
        if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None or visual.pool_type != "tok":
            raise ValueError(f"model {model_name!r}: DA-CLIP needs a ViT vision tower with class-token pooling")
        if len(set(visual.image_size)) != 1:
            raise ValueError(f"model {model_name!r}: DA-CLIP preprocessing needs a square image_size")
        self.image_size = visual.image_size[0]
        self.context_length = self.clip.context_length
        self.visual_control = copy.deepcopy(visual)
        self.control_zero = nn.ModuleList(
            _zero_linear(visual.transformer.width) for _ in visual.transformer.resblocks
        )
        self.names = names
        self.requires_grad_(False)
        self.eval()
        self.register_buffer("pixel_mean", torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def names(self) -> tuple[str, ...]:
        return self._names

    @names.setter
    def names(self, names: Sequence[str]) -> None:
        names = (names,) if isinstance(names, str) else tuple(names)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"names must be a non-empty sequence of non-empty strings, got {names!r}")
        self._names = names
        self._text_cache = None

    @property
    def embed_dim(self) -> int:
        """Width of ``P_f``: the CLIP embedding dimension (512 for ViT-B-32)."""
        return self.clip.visual.output_dim

    def train(self, mode: bool = True) -> "DAClipPrior":
        # Frozen prior: a parent's model.train() must not flip it out of eval mode.
        return super().train(False)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._text_cache = None  # the cached text features belong to the old weights
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ------------------------------------------------------------------ towers

    @staticmethod
    def _tokens(tower: VisionTransformer, pixels: torch.Tensor) -> torch.Tensor:
        """Patch + class tokens with positions, after ``ln_pre``: (B, 1 + grid², width)."""
        x = tower.conv1(pixels).flatten(2).transpose(1, 2)
        cls = tower.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + tower.positional_embedding.to(x.dtype)
        return tower.ln_pre(tower.patch_dropout(x))

    @staticmethod
    def _pooled(tower: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
        """Class token -> ``ln_post`` -> ``proj``: (B, embed_dim)."""
        return tower.ln_post(x[:, 0]) @ tower.proj

    @staticmethod
    def _blocks(tower: VisionTransformer):
        # open_clip < 3 runs its blocks sequence-first; the hiddens are per token, so adding them
        # works the same in either layout as long as we feed each version what it expects.
        return tower.transformer.resblocks, not getattr(tower.transformer, "batch_first", False)

    def encode_image(self, pixels: torch.Tensor, control: bool = True):
        """DA-CLIP's two image embeddings of preprocessed pixels.

        Args:
            pixels: (B, 3, S, S) CLIP-normalised, S = ``image_size``.
            control: ``False`` gives plain CLIP's ``encode_image`` (one tensor), as in the public
                DaCLIP.
        Returns:
            ``(image_features, degra_features)``, both (B, embed_dim) in the compute dtype.
        """
        if not control:
            return self.clip.encode_image(pixels)
        blocks, seq_first = self._blocks(self.visual_control)
        x = self._tokens(self.visual_control, pixels)
        x = x.transpose(0, 1) if seq_first else x
        hiddens = []
        for block, zero in zip(blocks, self.control_zero):
            x = block(x)
            hiddens.append(zero(x))
        degra_features = self._pooled(self.visual_control, x.transpose(0, 1) if seq_first else x)

        blocks, seq_first = self._blocks(self.clip.visual)
        x = self._tokens(self.clip.visual, pixels)
        x = x.transpose(0, 1) if seq_first else x
        for block in blocks:
            x = block(x) + hiddens.pop()
        image_features = self._pooled(self.clip.visual, x.transpose(0, 1) if seq_first else x)
        return image_features, degra_features

    def encode_text(self, names: Sequence[str]) -> torch.Tensor:
        """CLIP text features of ``names`` with open_clip's bundled BPE tokenizer: (D, embed_dim)."""
        tokens = open_clip.tokenize(list(names), context_length=self.context_length)
        return self.clip.encode_text(tokens.to(self.clip.token_embedding.weight.device))

    def text_features(self) -> torch.Tensor:
        """Normalised text features of :attr:`names`, (D, embed_dim), computed once: float32, or
        with :attr:`fp16_text` float16 from the tower under float16 autocast.

        Recomputed when the names, the device, the dtype, ``fp16_text`` or the weights change.
        """
        weight = self.clip.token_embedding.weight
        key = (self._names, weight.device, weight.dtype, self.fp16_text)
        if self._text_cache is None or self._text_cache[0] != key:
            with torch.no_grad(), torch.autocast(weight.device.type, dtype=torch.float16, enabled=self.fp16_text):
                features = self.encode_text(self._names)
            features = _unit(features) if self.fp16_text else F.normalize(features.float(), dim=-1)
            self._text_cache = (key, features)
        return self._text_cache[1]

    # ------------------------------------------------------------------ prior

    @torch.no_grad()
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) as the network sees them (``M2RestoreConfig.input_range``: [0, 1], or
        [-1, 1] for the authors' ``"bilinear"`` pipeline) -> (B, 3, S, S), S = ``image_size``, float32.

        Shorter side to S (antialiased, long side ``int(S·long/short)`` as torchvision's ``Resize``)
        then a centre crop; by :attr:`preprocessing`:

        - ``"daclip"``: CLIP's eval transform of [0, 1] images, bicubic, clamped to [0, 1] as the 8-bit PIL pipeline
          DA-CLIP was trained with is, then OpenAI mean/std;
        - ``"bilinear"``: the authors' ``Resize(S, antialias=True)`` and ``CenterCrop(S)`` on the
          tensor, bilinear, neither clamped nor normalised (their loaders feed it [-1, 1]).
        """
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a (B, 3, H, W) tensor, got {getattr(images, 'shape', type(images))}")
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point in [0, 1], got {images.dtype}")
        size = self.image_size
        h, w = images.shape[-2:]
        x = images.float()
        daclip = self.preprocessing == "daclip"
        if min(h, w) != size:
            target = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
            x = F.interpolate(x, size=target, mode="bicubic" if daclip else "bilinear", align_corners=False,
                              antialias=True)
            x = x.clamp_(0, 1) if daclip else x
        h, w = x.shape[-2:]
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        x = x[..., top:top + size, left:left + size]
        return (x - self.pixel_mean) / self.pixel_std if daclip else x

    @torch.no_grad()
    def priors(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(d_g (B, D), P_f (B, embed_dim))``, float32, from :meth:`preprocess`'d pixels."""
        text = self.text_features()
        on_cuda = pixels.device.type == "cuda"
        with torch.autocast(pixels.device.type, dtype=torch.float16, enabled=on_cuda):
            image_features, degra_features = self.encode_image(pixels.to(self.clip.visual.proj.dtype))
        if self.fp16_text:  # their `100.0 * degra @ text.T` under autocast: (100·degra) @ textᵀ, all float16
            with torch.autocast(pixels.device.type, dtype=torch.float16):  # whatever autocast the caller runs
                similarity = (_unit(degra_features).mul(SIMILARITY_SCALE) @ text.T).float()
        else:
            similarity = SIMILARITY_SCALE * (F.normalize(degra_features.float(), dim=-1) @ text.T)
        return torch.softmax(similarity, dim=-1), image_features.float()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) in [0, 1], any size, on the prior's device -> ``(d_g, P_f)``."""
        return self.priors(self.preprocess(images))

    # ------------------------------------------------------------------ checkpoints

    def state_dict_public(self, alias: bool = True) -> dict[str, torch.Tensor]:
        """This prior in the public ``daclip_ViT-B-32.pt`` key layout.

        ``clip.*``; ``visual_control.*`` with the blocks under
        ``visual_control.transformer.transformer.resblocks.N`` and the zero layers under
        ``visual_control.transformer.zero_modules.N``; ``logit_scale``; with ``alias``, the
        ``visual.*`` copy of ``clip.visual.*`` the public class also saves.
        """
        state = {_to_public(k): v for k, v in self.state_dict().items()}
        state["logit_scale"] = self.clip.logit_scale.detach().clone()
        if alias:
            state.update({k[len("clip."):]: v for k, v in state.items() if k.startswith("clip.visual.")})
        return state

    def load_public_state_dict(self, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load a state dict in the public layout (``module.`` prefixes already stripped).

        The ``visual.*`` alias is optional; when present it must equal ``clip.visual.*``. The
        top-level ``logit_scale`` (the controller's training temperature) is required but unused:
        ``d_g`` uses DA-CLIP's fixed scale 100. Raises ``ValueError`` listing the first missing,
        unexpected and mis-shaped keys with their counts.
        """
        expected = self.state_dict_public(alias=False)
        missing = [k for k in expected if k not in state]
        unexpected, shapes, differing = [], [], []
        for key, value in state.items():
            target = "clip." + key if key.startswith("visual.") else key
            if target not in expected:
                unexpected.append(key)
            elif value.shape != expected[target].shape:
                shapes.append(f"{key}: {tuple(value.shape)} vs {tuple(expected[target].shape)} expected")
            elif target != key and target in state and not torch.equal(value, state[target]):
                differing.append(key)
        problems = [
            _listing(what, items) for what, items in (
                ("missing keys", missing), ("unexpected keys", unexpected),
                ("wrong shapes", shapes), ("visual.* aliases differing from clip.visual.*", differing),
            ) if items
        ]
        if problems:
            raise ValueError(f"{source} does not fit DA-CLIP {self.model_name!r}: " + "; ".join(problems))
        ours = {_from_public(k): v for k, v in state.items() if k != "logit_scale" and not k.startswith("visual.")}
        self.load_state_dict(ours, strict=True)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        names: Sequence[str] = DEFAULT_NAMES,
        model_name: str = "ViT-B-32",
        model_cfg: Mapping | None = None,
        preprocessing: str = "daclip",
        fp16_text: bool = False,
    ) -> "DAClipPrior":
        """A prior with the weights of a public DA-CLIP checkpoint (e.g. ``daclip_ViT-B-32.pt``).

        Loaded safely (``weights_only=True``); see :func:`read_checkpoint` for the accepted
        containers and :meth:`load_public_state_dict` for the key layout and its errors.
        """
        state = read_checkpoint(path)
        prior = cls(model_name, names=names, model_cfg=model_cfg, preprocessing=preprocessing, fp16_text=fp16_text)
        prior.load_public_state_dict(state, source=str(path))
        return prior
