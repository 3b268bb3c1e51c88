"""The shipped tiny demo model on synthetic weather, and how it was trained (``m2restore demo``).

``m2restore demo [--out DIR]`` restores the bundled degraded samples (``assets/samples``) into a
before/after grid (``DIR/demo_grid.png``) and prints PSNR/SSIM before and after restoration on
a held-out synthetic set: photographs that ship with scikit-image and were never trained on,
degraded by :mod:`m2restore.data.synthetic` with fixed seeds.

``m2restore demo --train --minutes M --out DIR`` reproduces the shipped weights: the ``tiny()``
network, without the DA-CLIP prior, with the plain PyTorch backend, trained on this CPU on
random crops of the other scikit-image photographs under freshly drawn synthetic rain, haze,
snow and raindrops. The number of steps is fitted to the time budget by timing a few steps
first, so that the cosine schedule ends when the time does. It writes ``config.json`` and
``model.safetensors`` into DIR (resumable run state in ``DIR/run``).

This is a demonstration of the pipeline, not the paper's model, which needs the All-weather
data set, a GPU and DA-CLIP.
"""
from __future__ import annotations

import copy
import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import torch

from .assets import SAMPLES
from .options import DEMO_BATCH_SIZE, DEMO_CROP, DEMO_LR, DEMO_LR_DECAY

# Photographs bundled with scikit-image (no download). Held-out ones are never trained on.
TRAIN_PHOTOS = ("astronaut", "chelsea", "immunohistochemistry", "hubble_deep_field", "brick", "grass",
                "gravel", "moon", "coins", "clock", "page")
HELD_OUT_PHOTOS = ("rocket", "coffee", "camera")
KINDS = ("rain", "haze", "snow", "raindrop")
HELD_OUT_SIZE = 192
BATCHES_PER_EPOCH = 64
CKPT_EVERY = 100  # optimizer steps between checkpoints of a --train run


def load_photo(name: str) -> np.ndarray:
    """A scikit-image photograph as (H, W, 3) float32 in [0, 1] (grayscale repeated)."""
    import skimage.data

    img = getattr(skimage.data, name)()
    img = img.astype(np.float32) / 255.0
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])


def held_out_set(size: int = HELD_OUT_SIZE) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """(photo, kind, clean, degraded) for every held-out photo and kind: the centre
    ``size × size`` crop of the photo, degraded with a seed fixed per (photo, kind)."""
    from .data.synthetic import degrade

    items = []
    for p, name in enumerate(HELD_OUT_PHOTOS):
        photo = load_photo(name)
        top, left = (photo.shape[0] - size) // 2, (photo.shape[1] - size) // 2
        clean = np.ascontiguousarray(photo[top:top + size, left:left + size])
        for k, kind in enumerate(KINDS):
            items.append((name, kind, clean, degrade(clean, kind, seed=_held_out_seed(p, k))))
    return items


def _held_out_seed(photo: int, kind: int) -> int:
    """The degradation seed of held-out photo number ``photo`` under kind number ``kind``:
    distinct for up to 10 kinds. Other values would make another held-out set, and other
    numbers than the README's."""
    return 1000 + 10 * photo + kind


@torch.no_grad()
def measure(model, device: str | torch.device = "cpu") -> dict[str, dict[str, float]]:
    """Mean PSNR/SSIM (RGB, 8-bit quantised) of the held-out set before and after restoration,
    per degradation kind and over all: {kind: {psnr_in, ssim_in, psnr_out, ssim_out}}."""
    from .evaluate import image_metrics, quantize

    model.eval()
    rows: dict[str, list[dict[str, float]]] = {}
    for _, kind, clean, degraded in held_out_set():
        x = torch.from_numpy(degraded).permute(2, 0, 1)[None].to(device)
        out = model(x).clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy()
        before, after = image_metrics(quantize(degraded), clean), image_metrics(quantize(out), clean)
        rows.setdefault(kind, []).append({"psnr_in": before["psnr"], "ssim_in": before["ssim"],
                                          "psnr_out": after["psnr"], "ssim_out": after["ssim"]})
    rows["all"] = [r for kind in KINDS for r in rows[kind]]
    return {kind: {m: float(np.mean([r[m] for r in rs])) for m in rs[0]} for kind, rs in rows.items()}


def format_measure(result: dict[str, dict[str, float]]) -> str:
    lines = [f"held-out synthetic set ({', '.join(HELD_OUT_PHOTOS)}; {HELD_OUT_SIZE}×{HELD_OUT_SIZE})",
             f"{'':10}{'PSNR in':>9}{'PSNR out':>10}{'SSIM in':>9}{'SSIM out':>10}"]
    for kind, r in result.items():
        lines.append(f"{kind:10}{r['psnr_in']:9.2f}{r['psnr_out']:10.2f}{r['ssim_in']:9.3f}{r['ssim_out']:10.3f}")
    return "\n".join(lines)


def before_after_grid(pairs: list[tuple[str, np.ndarray, np.ndarray]], path: Path) -> None:
    """A PNG with one row per (label, before, after): the degraded and restored images
    side by side, the label on the left."""
    from PIL import Image, ImageDraw

    pad, label_w, head = 6, 80, 18
    h = max(b.shape[0] for _, b, _ in pairs)
    w = max(b.shape[1] for _, b, _ in pairs)
    canvas = Image.new("RGB", (label_w + 2 * w + 3 * pad, head + len(pairs) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((label_w + pad, 3), "input", fill="black")
    draw.text((label_w + w + 2 * pad, 3), "restored (tiny demo model)", fill="black")
    for i, (label, before, after) in enumerate(pairs):
        y = head + i * (h + pad)
        draw.text((pad, y + h // 2 - 6), label, fill="black")
        for j, img in enumerate((before, after)):
            tile = Image.fromarray(np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8))
            canvas.paste(tile, (label_w + pad + j * (w + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def write_samples(folder: Path = SAMPLES, size: int = 160) -> list[Path]:
    """Write the bundled samples: one degraded held-out crop per kind (regenerates assets)."""
    from .data.io import ImageData, write_image

    folder.mkdir(parents=True, exist_ok=True)
    chosen = {kind: (name, degraded) for name, kind, _, degraded in held_out_set(size)
              if name == HELD_OUT_PHOTOS[KINDS.index(kind) % len(HELD_OUT_PHOTOS)]}
    paths = []
    for kind in KINDS:
        name, degraded = chosen[kind]
        paths.append(folder / f"{kind}_{name}.png")
        write_image(paths[-1], ImageData(degraded))
    return paths


def train_demo(out: Path, minutes: float, steps: int | None = None, crop: int = DEMO_CROP,
               batch_size: int = DEMO_BATCH_SIZE, lr: float = DEMO_LR, seed: int = 0, resume: bool = False,
               progress: bool = True) -> dict:
    """Train the demo model (see the module docstring); returns fit()'s summary plus the
    held-out measurement and the measured speed."""
    from .data.datasets import SyntheticPairs
    from .model import M2Restore, M2RestoreConfig
    from .prior import NullPrior
    from .train import CHECKPOINT, TrainOptions, fit, load_checkpoint, seed_everything

    seed_everything(seed)
    # The shipped weights were trained without a prior and with the counted load term
    # (see M2RestoreConfig.balance_load).
    config = M2RestoreConfig.tiny(backend="torch", balance_load="count", trained_with_prior=False)
    model = M2Restore(config, prior=NullPrior(config.num_degradations, config.prior_dim))
    photos = [load_photo(name) for name in TRAIN_PHOTOS]
    train_set = SyntheticPairs(photos, KINDS, crop=crop, length=BATCHES_PER_EPOCH * batch_size, seed=seed)
    opts = TrainOptions(epochs=1, batch_size=batch_size, accum=1, lr=lr, min_lr=lr / DEMO_LR_DECAY, seed=seed,
                        max_seconds=minutes * 60.0, ckpt_every=CKPT_EVERY)
    if resume:
        steps = load_checkpoint(out / "run" / CHECKPOINT)["options"]["total_steps"]
    elif steps is None:
        steps = max(1, int(minutes * 60.0 / _seconds_per_step(model, train_set, opts)))
    seed_everything(seed)
    opts = dataclasses.replace(opts, epochs=steps // (len(train_set) // batch_size) + 1, total_steps=steps,
                               max_steps=steps)
    summary = fit(model, train_set, out / "run", opts, "cpu", resume=resume, progress=progress)
    model.save_pretrained(out)
    summary["steps_per_s"] = summary["steps"] / max(summary["seconds"], 1e-9)
    summary["held_out"] = measure(model)
    return summary


def _seconds_per_step(model, train_set, opts, trial_steps: int = 4) -> float:
    """Seconds per optimizer step, timed with fit() itself on a throwaway copy of the model;
    the first step (warm-up) is left out."""
    from .train import fit

    with tempfile.TemporaryDirectory() as tmp:
        trial = dataclasses.replace(opts, max_steps=1, max_seconds=None, ckpt_every=0)
        first = fit(copy.deepcopy(model), train_set, tmp, trial, progress=False)["seconds"]
        total = fit(copy.deepcopy(model), train_set, tmp, dataclasses.replace(trial, max_steps=trial_steps + 1),
                    progress=False)["seconds"]
    return (total - first) / trial_steps


def restore_samples(model) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(kind, degraded, restored) for each bundled sample, restored by ``model`` on the CPU;
    images are (H, W, 3) float32 in [0, 1]."""
    from .data.io import find_images, read_image
    from .restore import restore_tensor

    pairs = []
    for path in find_images(SAMPLES):
        before = read_image(path).rgb
        after = restore_tensor(model, torch.from_numpy(before).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
        pairs.append((path.stem.split("_")[0], before, after))
    return pairs
