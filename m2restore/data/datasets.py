"""Paired restoration data: (degraded input, clean ground truth) image pairs.

Two on-disk layouts are understood:

* **All-weather list** (TransWeather, WeatherDiffusion): a text file listing input images,
  one path per line, relative to a root folder (by default the list's own folder); the
  ground truth of ``.../input/x.png`` is ``.../gt/x.png``.
* **Paired folders** (CDD-11 and most others): ``ROOT/input/`` and ``ROOT/gt/``, matched by
  relative path, or by stem when the extensions differ.

Randomness (crops, flips, synthetic degradations) is a function of ``(seed, epoch, index)``
only, never of a global generator, so that a resumed training run draws exactly the samples
the uninterrupted run would have drawn, whatever the number of loader workers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .io import find_images, read_image
from .synthetic import degrade


@dataclass(frozen=True)
class Pair:
    """One example: the input and ground-truth files, and ``key``, the input's path relative
    to the data root (its name in logs and its key in a prior cache)."""

    input: Path
    gt: Path
    key: str


def allweather_pairs(list_file: str | Path, root: str | Path | None = None) -> list[Pair]:
    """Pairs of an All-weather style list file; ``root`` defaults to the list's folder."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(f"list file not found: {list_file}")
    root = Path(root) if root is not None else list_file.parent
    pairs = []
    for line in list_file.read_text().splitlines():
        rel = line.strip()
        if not rel or rel.startswith("#"):
            continue
        pairs.append(Pair(root / rel, root / _gt_path(rel), Path(rel).as_posix()))
    if not pairs:
        raise ValueError(f"list file {list_file} names no images")
    return _checked(pairs)


def paired_folder_pairs(root: str | Path) -> list[Pair]:
    """Pairs of ``root/input/**`` and ``root/gt/**`` matched by relative path (or stem)."""
    root = Path(root)
    inp, gt = root / "input", root / "gt"
    if not inp.is_dir() or not gt.is_dir():
        raise FileNotFoundError(f"paired folder layout needs {inp} and {gt}")
    gt_by_stem = {p.relative_to(gt).with_suffix("").as_posix(): p for p in find_images(gt)}
    pairs = []
    for p in find_images(inp):
        rel = p.relative_to(inp)
        match = gt / rel if (gt / rel).is_file() else gt_by_stem.get(rel.with_suffix("").as_posix())
        if match is None:
            raise FileNotFoundError(f"no ground truth for {p} (looked for {gt / rel})")
        pairs.append(Pair(p, match, (Path("input") / rel).as_posix()))
    if not pairs:
        raise ValueError(f"no images in {inp}")
    return pairs


def open_pairs(spec: str | Path) -> list[Pair]:
    """Pairs from a list file (All-weather) or a folder with ``input/`` and ``gt/``."""
    spec = Path(spec)
    if spec.is_file():
        return allweather_pairs(spec)
    if spec.is_dir():
        return paired_folder_pairs(spec)
    raise FileNotFoundError(f"data not found: {spec} (give an All-weather list file or a folder with input/ and gt/)")


class PairedImages(Dataset):
    """Image pairs as float32 tensors, randomly cropped and flipped for training.

    Each item is a dict: ``input`` and ``gt`` (3, h, w) in [0, 1], ``name`` (the pair's key),
    and, with a prior cache, ``d_g`` (D,) and ``P_f`` (512,). With ``crop`` the images are
    padded by reflection when smaller than the crop, then cut to ``crop × crop``; with
    ``crop=None`` they are returned whole. ``flip`` adds random horizontal and vertical flips.
    """

    def __init__(self, pairs: Sequence[Pair], crop: int | None = 224, flip: bool = True,
                 prior_cache=None, seed: int = 0):
        if crop is not None and crop < 1:
            raise ValueError(f"crop must be positive, got {crop}")
        self.pairs = list(pairs)
        self.crop, self.flip, self.prior_cache, self.seed = crop, flip, prior_cache, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        pair = self.pairs[index]
        x, y = read_image(pair.input).rgb, read_image(pair.gt).rgb
        if x.shape != y.shape:
            raise ValueError(f"input {pair.input} is {x.shape[1]}x{x.shape[0]} but its ground truth "
                             f"{pair.gt} is {y.shape[1]}x{y.shape[0]}")
        if self.crop is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            x, y = random_crop_flip(rng, self.crop, self.flip, x, y)
        item = {"input": _chw(x), "gt": _chw(y), "name": pair.key}
        if self.prior_cache is not None:
            d_g, p_f = self.prior_cache[pair.key]
            item["d_g"], item["P_f"] = torch.as_tensor(d_g).float(), torch.as_tensor(p_f).float()
        return item


class SyntheticPairs(Dataset):
    """Crops of clean photographs degraded on the fly by :func:`~m2restore.data.synthetic.degrade`.

    photos: clean (H, W, 3) float32 arrays in [0, 1]; kinds: degradation kinds, cycled over
    the indices; ``length`` items per epoch. Items are dicts like :class:`PairedImages`'
    plus ``kind``.
    """

    def __init__(self, photos: Sequence[np.ndarray], kinds: Sequence[str], crop: int, length: int, seed: int = 0):
        if not photos or not kinds:
            raise ValueError("photos and kinds must not be empty")
        self.photos, self.kinds, self.crop, self.length, self.seed = list(photos), list(kinds), crop, length, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        photo = self.photos[int(rng.integers(len(self.photos)))]
        (clean,) = random_crop_flip(rng, self.crop, True, photo)
        kind = self.kinds[index % len(self.kinds)]
        degraded = degrade(clean, kind, rng)
        return {"input": _chw(degraded), "gt": _chw(clean), "name": f"{kind}/{index}", "kind": kind}


def random_crop_flip(rng: np.random.Generator, crop: int, flip: bool, *images: np.ndarray) -> list[np.ndarray]:
    """The same random ``crop × crop`` window (after reflection padding of images smaller than
    the crop) and the same random flips applied to every (H, W, C) image."""
    h, w = images[0].shape[:2]
    ph, pw = max(0, crop - h), max(0, crop - w)
    if ph or pw:
        images = tuple(np.pad(im, ((0, ph), (0, pw), (0, 0)), mode="reflect") for im in images)
        h, w = h + ph, w + pw
    top, left = int(rng.integers(h - crop + 1)), int(rng.integers(w - crop + 1))
    out = [im[top:top + crop, left:left + crop] for im in images]
    if flip:  # horizontal, then vertical, each with probability 1/2
        if rng.random() < 0.5:
            out = [im[:, ::-1] for im in out]
        if rng.random() < 0.5:
            out = [im[::-1] for im in out]
    return out


def _chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def _gt_path(rel: str) -> str:
    """The ground truth beside an input: the last path component named ``input`` becomes
    ``gt``; failing that, the last occurrence of ``input`` in the path (as TransWeather does)."""
    parts = list(Path(rel).parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "input":
            parts[i] = "gt"
            return str(Path(*parts))
    at = rel.rfind("input")
    if at < 0:
        raise ValueError(f"cannot derive the ground truth path of {rel!r}: it contains no 'input'")
    return rel[:at] + "gt" + rel[at + len("input"):]


def _checked(pairs: list[Pair]) -> list[Pair]:
    for pair in pairs:
        for path in (pair.input, pair.gt):
            if not path.is_file():
                raise FileNotFoundError(f"image file not found: {path}")
    return pairs
