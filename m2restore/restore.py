"""Running a trained model on images: loading it, its precision and device, tiled restoration.

:func:`load_model` gives a trained M2Restore in eval mode; :data:`PRECISIONS` and :func:`autocast`
name the precisions it can run at, :func:`default_device` picks the device. :func:`restore_tensor`
restores a batch, whole or in overlapping tiles blended with linear ramps (the degradation prior
computed once on the whole image, so every tile is routed alike). :func:`restore_file` restores
one image file into another that keeps its size, format, bit depth, grayscale-ness and alpha
channel (alpha is passed through untouched; the network sees RGB); :func:`collect_inputs` maps
files and folders to the outputs ``m2restore restore`` writes.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterable

import torch

from .precision import PRECISIONS

DEMO_WEIGHTS = Path(__file__).resolve().parent / "assets" / "demo_tiny"
# Pixels shared by neighbouring tiles: the linear blend over this width hides seams, for
# (tile / (tile - overlap))² times the work of restoring the image whole.
TILE_OVERLAP = 32


def default_device(device: str | None = None) -> torch.device:
    """``device`` if given, else cuda when torch sees a GPU, else cpu."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def autocast(device: torch.device, precision: str):
    """The context the network runs in at ``precision`` (a key of :data:`PRECISIONS`) on ``device``."""
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def load_model(weights: str | Path, device: str | torch.device = "cpu", backend: str | None = None,
               prior_checkpoint: str | Path | None = None):
    """A trained M2Restore in eval mode on ``device``; ``backend`` overrides the saved one.

    Without ``prior_checkpoint`` the model runs with the null prior (the model warns unless
    these are the shipped demo weights, which were trained without DA-CLIP).
    """
    from .model import CONFIG_NAME, WEIGHTS_NAME, M2Restore, M2RestoreConfig
    from .prior import NullPrior

    weights = Path(weights)
    if not (weights / WEIGHTS_NAME).is_file() or not (weights / CONFIG_NAME).is_file():
        hint = "; train them with `m2restore demo --train` or pass --weights" if weights.resolve() == DEMO_WEIGHTS else ""
        raise FileNotFoundError(f"{weights} must hold {CONFIG_NAME} and {WEIGHTS_NAME}{hint}")
    prior = None
    if prior_checkpoint is None and weights.resolve() == DEMO_WEIGHTS:
        config = M2RestoreConfig.from_dict(json.loads((weights / CONFIG_NAME).read_text()))
        prior = NullPrior(config.num_degradations, config.prior_dim)
    model = M2Restore.from_pretrained(weights, prior=prior, prior_checkpoint=prior_checkpoint, backend=backend)
    return model.to(device).eval()


@torch.no_grad()
def restore_tensor(model, x: torch.Tensor, tile: int = 0, overlap: int = TILE_OVERLAP,
                   prior: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Restore x (B, 3, H, W) in [0, 1] -> (B, 3, H, W) in [0, 1], in x's dtype (also under autocast).

    With ``tile`` > 0 and an image larger than it, the image is cut into ``tile × tile``
    windows overlapping by ``overlap`` pixels; outputs are averaged with weights that ramp
    linearly over the overlap, which hides tile seams. ``prior`` (d_g, P_f) is the degradation
    prior of the whole image; by default the model's prior module computes it once.
    """
    if tile < 0 or overlap < 0:
        raise ValueError(f"tile and overlap must be non-negative, got tile={tile}, overlap={overlap}")
    _, _, h, w = x.shape
    if tile == 0 or (h <= tile and w <= tile):
        return model(x, prior=prior).to(x.dtype).clamp(0.0, 1.0)
    if overlap >= tile:
        raise ValueError(f"tile_overlap ({overlap}) must be smaller than tile ({tile})")
    if prior is None:
        prior = model.prior(x)
    out = torch.zeros_like(x)
    weight = torch.zeros_like(x[:, :1])
    for top in _starts(h, tile, overlap):
        for left in _starts(w, tile, overlap):
            window = x[:, :, top:top + tile, left:left + tile]
            ramp = _ramp(window.shape[2], overlap, x)[:, None] * _ramp(window.shape[3], overlap, x)[None, :]
            out[:, :, top:top + tile, left:left + tile] += model(window, prior=prior) * ramp
            weight[:, :, top:top + tile, left:left + tile] += ramp
    return (out / weight).clamp(0.0, 1.0)


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    """Window offsets covering [0, size): stride tile − overlap, the last flush with the end."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]


def _ramp(n: int, overlap: int, like: torch.Tensor) -> torch.Tensor:
    """(n,) weights rising linearly over ``overlap`` pixels at both ends, 1 in between; > 0."""
    i = torch.arange(n, dtype=like.dtype, device=like.device)
    edge = torch.minimum(i + 1, n - i) / (overlap + 1)
    return edge.clamp(max=1.0)


def collect_inputs(inputs: Iterable[str | Path]) -> list[tuple[Path, Path]]:
    """(image file, its output path relative to OUTDIR) for files and folders (recursive)."""
    from .data.io import find_images, is_image_file

    found: list[tuple[Path, Path]] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += [(p, p.relative_to(item)) for p in find_images(item)]
        elif item.is_file():
            if not is_image_file(item):
                raise ValueError(f"not a PNG or JPEG file: {item}")
            found.append((item, Path(item.name)))
        else:
            raise FileNotFoundError(f"input not found: {item}")
    seen: dict[Path, Path] = {}
    for src, rel in found:
        if rel in seen:
            raise ValueError(f"{src} and {seen[rel]} would both be written to {rel}")
        seen[rel] = src
    return found


def restore_file(model, src: Path, dst: Path, device: torch.device, precision: str = "fp32", tile: int = 0,
                 overlap: int = TILE_OVERLAP) -> None:
    """Restore the image file ``src`` into ``dst`` (format by its extension) with ``model`` on
    ``device`` at ``precision``; ``dst`` keeps ``src``'s alpha, bit depth and grayscale-ness."""
    from .data.io import ImageData, read_image, write_image

    image = read_image(src)
    x = torch.from_numpy(image.rgb).permute(2, 0, 1)[None].to(device)
    with autocast(device, precision):
        y = restore_tensor(model, x, tile, overlap)
    y = y[0].permute(1, 2, 0).cpu().numpy()
    write_image(dst, ImageData(y, image.alpha, image.bit_depth, image.grayscale))
