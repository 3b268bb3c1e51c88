"""Precomputed DA-CLIP priors, so that training does not rerun the frozen CLIP every epoch.

``m2restore prior-cache --checkpoint daclip_ViT-B-32.pt --images DIR --out cache.safetensors``
computes ``(d_g, P_f)`` once per image file under ``DIR`` (recursively) and writes them to one
safetensors file, keyed by the file's path relative to ``DIR`` (POSIX separators):
``d_g/<relpath>`` (D,) and ``P_f/<relpath>`` (embed_dim,), float32. The metadata records the
degradation names, the CLIP model (name and open_clip config), the image preparation and the
input range the images were mapped to, so a reader can check they match its model config.
Point ``DIR`` at the data root the training set's keys are relative to.
:func:`~m2restore.data.io.find_images` lists the images a cache is written for.
"""
from __future__ import annotations

import json
import os
from pathlib import Path, PurePath
from typing import Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..config import UNIT_RANGE, to_input_range
from ..data.io import find_images, read_image
from ..options import PRIOR_BATCH_SIZE

__all__ = ["FORMAT", "PriorCache", "find_images", "write_prior_cache"]

FORMAT = "m2restore-prior-cache/1"
_D_G, _P_F = "d_g/", "P_f/"


def _key(relpath: str | os.PathLike) -> str:
    return PurePath(relpath).as_posix()


def _read_rgb(path: Path) -> torch.Tensor:
    """(1, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(read_image(path).rgb).permute(2, 0, 1).unsqueeze(0)


def write_prior_cache(
    prior,
    image_paths: Iterable[str | os.PathLike],
    root: str | os.PathLike,
    out: str | os.PathLike,
    batch_size: int = PRIOR_BATCH_SIZE,
    metadata: Mapping[str, str] | None = None,
    progress: bool = True,
    input_range: tuple[float, float] = UNIT_RANGE,
) -> int:
    """Compute ``prior``'s ``(d_g, P_f)`` for each image and save them to ``out``.

    Args:
        prior: a :class:`~m2restore.prior.daclip.DAClipPrior`; it runs on its own device. Images are
            preprocessed one by one (they may differ in size) and the CLIP runs in batches.
        image_paths: files under ``root``; each is keyed by its path relative to ``root``.
        out: the safetensors file, written atomically (a temporary file, then renamed).
        metadata: extra string metadata (e.g. the checkpoint's name) besides names and model.
        input_range: the model config's ``input_range``: images are mapped onto it before the
            prior, as :meth:`~m2restore.model.M2Restore.network_input` maps them.
    Returns:
        the number of images written.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    root = Path(root)
    paths = [Path(p) for p in image_paths]
    keys = [_key(p.relative_to(root)) for p in paths]
    device = next(prior.parameters()).device
    tensors = {}
    with tqdm(total=len(paths), desc="prior cache", unit="img", disable=not progress) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = range(start, min(start + batch_size, len(paths)))
            pixels = torch.cat([prior.preprocess(to_input_range(_read_rgb(paths[i]).to(device), input_range))
                                for i in chunk])
            d_g, p_f = prior.priors(pixels)
            for row, i in enumerate(chunk):
                tensors[_D_G + keys[i]] = d_g[row].cpu().contiguous()
                tensors[_P_F + keys[i]] = p_f[row].cpu().contiguous()
            bar.update(len(chunk))
    meta = {"format": FORMAT, "names": json.dumps(list(prior.names)), "model": prior.model_name,
            "model_cfg": json.dumps(prior.model_cfg), "preprocessing": prior.preprocessing, "input_range": json.dumps(list(input_range)),
            "fp16_text": json.dumps(bool(getattr(prior, "fp16_text", False))),
            **(metadata or {})}
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, out)
    return len(paths)


class PriorCache:
    """Read a prior cache: ``cache[relpath] -> (d_g (D,), P_f (embed_dim,))``, float32 on CPU.

    The whole file is loaded at construction (a few KB per image); ``names``, ``model``,
    ``preprocessing``, ``input_range`` (a tuple of floats) and ``fp16_text`` come from its metadata.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
        except FileNotFoundError:
            raise
        except Exception as err:
            raise ValueError(f"{self.path} is not a safetensors prior cache: {err}") from err
        if meta.get("format") != FORMAT:
            raise ValueError(f"{self.path} is not a prior cache (format {meta.get('format')!r}, expected {FORMAT!r})")
        self.names = tuple(json.loads(meta["names"]))
        self.model = meta["model"]
        # Caches written before the switch existed used DA-CLIP's own transform.
        self.preprocessing = meta.get("preprocessing", "daclip")
        self.input_range = tuple(json.loads(meta.get("input_range", json.dumps(list(UNIT_RANGE)))))
        self.fp16_text = json.loads(meta.get("fp16_text", "false"))
        self.metadata = meta
        self._tensors = load_file(str(self.path))

    def __len__(self) -> int:
        return len(self._tensors) // 2

    def __contains__(self, relpath) -> bool:
        return _D_G + _key(relpath) in self._tensors

    def keys(self) -> list[str]:
        """The cached relative paths, sorted."""
        return sorted(k[len(_D_G):] for k in self._tensors if k.startswith(_D_G))

    def __getitem__(self, relpath: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
        key = _key(relpath)
        if _D_G + key not in self._tensors:
            raise KeyError(f"{key!r} is not in prior cache {self.path} ({len(self)} images)")
        return self._tensors[_D_G + key], self._tensors[_P_F + key]
