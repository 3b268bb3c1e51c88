"""Synthetic adverse weather for the demo model: rain streaks, haze, snow and raindrops.

Every function maps a clean (H, W, 3) float32 image in [0, 1] to a degraded one of the same
shape and dtype, drawing its randomness from the ``np.random.Generator`` it is given, so that
``degrade(clean, kind, seed)`` is a pure function of its arguments. The models are simple but
physical where physics is cheap: haze follows the atmospheric scattering model
``I = J·t + A·(1 − t)`` with ``t = exp(−β·depth)``; rain streaks are motion-blurred sparse
drops screened onto the scene; snow is blurred particles in two depth layers composited over
it; raindrops on the lens are soft elliptical patches through which the scene is seen blurred
and brightened.

The numeric ranges in these functions (densities, sizes, blur widths, brightness) are appearance
parameters of the demo's training data, not measurements: each draw keeps its degradation clearly
visible on the demo's 64-192 px images while the scene stays recognisable.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage, signal

# Degradation kind -> the DA-CLIP degradation name (docs/design.md#daclip-prior) it stands for.
DEGRADATIONS = {"rain": "rainy", "haze": "hazy", "snow": "snowy", "raindrop": "raindrop"}


def degrade(clean: np.ndarray, kind: str, seed: int | np.random.Generator) -> np.ndarray:
    """Apply one synthetic degradation. clean: (H, W, 3) float in [0, 1] -> float32, same shape."""
    if kind not in DEGRADATIONS:
        raise ValueError(f"kind must be one of {sorted(DEGRADATIONS)}, got {kind!r}")
    if clean.ndim != 3 or clean.shape[-1] != 3:
        raise ValueError(f"clean must be (H, W, 3), got shape {clean.shape}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    fn = {"rain": add_rain, "haze": add_haze, "snow": add_snow, "raindrop": add_raindrops}[kind]
    return np.clip(fn(clean.astype(np.float32), rng), 0.0, 1.0).astype(np.float32)


def add_rain(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rain streaks: sparse drops smeared along one direction, screen-blended onto the image."""
    h, w, _ = img.shape
    density = rng.uniform(0.002, 0.008)
    length = int(rng.integers(9, 25)) | 1
    angle = np.deg2rad(rng.uniform(-25.0, 25.0))
    drops = (rng.random((h, w)) < density) * rng.uniform(0.4, 1.0, (h, w))
    # Summed along the kernel, one drop leaves a streak as bright as the drop itself.
    streaks = signal.fftconvolve(drops, _line_kernel(length, angle) * length, mode="same")
    streaks = ndimage.gaussian_filter(np.clip(streaks, 0.0, 1.0), 0.6) * rng.uniform(0.5, 0.8)
    return 1.0 - (1.0 - img) * (1.0 - streaks[..., None])


def add_haze(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Haze by the atmospheric scattering model I = J·t + A·(1 − t), t = exp(−β·depth).

    Depth is a made-up scene depth: far at the top, near at the bottom, with smooth
    low-frequency variation; A is a bright, slightly tinted airlight.
    """
    h, w, _ = img.shape
    rows = np.linspace(1.0, 0.0, h, dtype=np.float32)[:, None]
    bumps = ndimage.gaussian_filter(rng.standard_normal((h, w)), sigma=max(h, w) / 8.0, mode="wrap")
    bumps = (bumps - bumps.mean()) / (bumps.std() + 1e-8)
    depth = np.clip(0.2 + 0.6 * rows ** rng.uniform(0.7, 1.5) + 0.12 * bumps, 0.0, 1.0)
    beta = rng.uniform(0.5, 1.5)
    airlight = rng.uniform(0.75, 0.95) + rng.uniform(-0.03, 0.03, 3)
    t = np.exp(-beta * depth)[..., None]
    return img * t + airlight * (1.0 - t)


def add_snow(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Snow: a far layer of many small flakes and a near layer of fewer, bigger, blurrier
    ones, each slightly motion-blurred as it falls, composited over the image."""
    h, w, _ = img.shape
    out = img
    for count, sigma in ((rng.uniform(0.004, 0.01), rng.uniform(0.6, 1.0)),
                         (rng.uniform(0.0006, 0.002), rng.uniform(1.4, 2.6))):
        flakes = (rng.random((h, w)) < count) * rng.uniform(0.6, 1.0, (h, w))
        flakes = ndimage.gaussian_filter(flakes, sigma) * (2.0 * np.pi * sigma ** 2)
        fall = _line_kernel(int(2 * sigma + 3) | 1, np.deg2rad(rng.uniform(-20.0, 20.0)))
        mask = np.clip(signal.fftconvolve(flakes, fall, mode="same") * 1.3, 0.0, 1.0)[..., None]
        out = out * (1.0 - mask) + rng.uniform(0.9, 1.0) * mask
    return out


def add_raindrops(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Raindrops on the lens: soft-edged ellipses inside which the scene is defocused,
    a little brighter, and bordered by a darker rim."""
    h, w, _ = img.shape
    short = min(h, w)
    blurred = ndimage.gaussian_filter(img, sigma=(max(2.0, short / 60.0),) * 2 + (0,))
    inside = np.zeros((h, w), np.float32)
    rim = np.zeros((h, w), np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(int(rng.integers(6, 16) * max(1.0, h * w / 256.0 ** 2) ** 0.5)):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry = rng.uniform(0.025, 0.08) * short
        rx = ry * rng.uniform(0.7, 1.1)
        r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
        inside = np.maximum(inside, np.clip((1.0 - r) / 0.25, 0.0, 1.0))
        rim = np.maximum(rim, np.exp(-(((r - 1.0) / 0.12) ** 2)))
    inside = inside[..., None]
    seen = np.clip(blurred * 1.1 + 0.06, 0.0, 1.0)
    return (img * (1.0 - inside) + seen * inside) * (1.0 - 0.2 * rim[..., None] * (1.0 - inside))


def _line_kernel(length: int, angle: float) -> np.ndarray:
    """(length, length) kernel of a one-pixel-wide line through the centre, ``angle`` radians
    from vertical, anti-aliased; sums to 1."""
    half = length // 2
    dy, dx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float64)
    along = dy * np.cos(angle) + dx * np.sin(angle)
    across = np.abs(dx * np.cos(angle) - dy * np.sin(angle))
    k = np.clip(1.0 - across, 0.0, 1.0) * (np.abs(along) <= half)
    return k / k.sum()
