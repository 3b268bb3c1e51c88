"""Running a trained model on images: loading it, its precision and device, tiled restoration.

:func:`load_model` gives a trained M2Restore in eval mode; :data:`PRECISIONS` and :func:`autocast`
name the precisions it can run at, :func:`default_device` picks the device. :func:`restore_tensor`
restores a batch, whole or in overlapping tiles blended with raised-cosine windows (the tiles share
the whole image's prior, task prompt and pixel reductions: docs/design.md#tiling).
:func:`restore_file` restores one image file into another that keeps its size, format, bit depth,
grayscale-ness, alpha channel (passed through untouched; the network sees RGB), EXIF and ICC
profile, tiling on its own as :func:`plan_restore` plans within a memory budget (the estimated
peak above the process baseline: weights, whole-image buffers, shared latent map, one forward);
:func:`collect_inputs` maps files and folders to the outputs ``m2restore restore`` writes.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .assets import DEMO_WEIGHTS
from .modules.statistics import TileStatistics
from .options import DEFAULT_STAT_PASSES, parse_size  # noqa: F401 - parse_size: this module's API too
from .paths import collect_inputs  # noqa: F401 - this module's API too
from .precision import PRECISIONS


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
    from .config import saved_config
    from .model import M2Restore
    from .prior import NullPrior

    config = saved_config(weights)
    prior = None
    if prior_checkpoint is None and Path(weights).resolve() == DEMO_WEIGHTS:
        prior = NullPrior(config.num_degradations, config.prior_dim)
    model = M2Restore.from_pretrained(weights, prior=prior, prior_checkpoint=prior_checkpoint, backend=backend)
    return model.to(device).eval()


@torch.no_grad()
def restore_tensor(model, x: torch.Tensor, tile: int = 0, overlap: int | None = None,
                   prior: tuple[torch.Tensor, torch.Tensor] | None = None, progress=None,
                   stat_passes: int = DEFAULT_STAT_PASSES, share_latent: bool = True, clamp: bool = True
                   ) -> torch.Tensor:
    """Restore x (B, 3, H, W) in [0, 1] -> (B, 3, H, W) in [0, 1], in x's dtype (also under autocast);
    ``clamp=False`` keeps the network's values outside [0, 1] (the authors' scoring reads them).

    With ``tile`` > 0 and an image larger than it, the image (padded as the network pads it) is cut
    into ``tile × tile`` windows overlapping by ``overlap`` pixels (default :func:`default_overlap`;
    both rounded to multiples of ``config.pad_multiple``, so every tile's feature maps line up with
    the whole image's) and the outputs are summed with the weights of :func:`blend_windows`, which
    add up to 1 at every pixel and fall smoothly to the tile edges, so no seam shows.

    Every tile gets the whole image's degradation prior (``prior`` (d_g, P_f), by default computed
    once by the model's prior module) and task prompt. The pixel reductions of the network
    (channel attention, the AFLB's pooling) are gathered over the tiles in ``stat_passes`` passes
    before the output pass (:class:`~m2restore.modules.statistics.TileStatistics`). With
    ``share_latent`` the tiles' bottleneck features are gathered too, and the latent stage (the
    MCDBs, whose Mamba scans run along whole rows) runs on the whole image's 1/8-resolution map
    between passes, each tile taking its window of the result (:func:`latent_map_bytes` of extra
    memory). With 0 passes each tile works on itself alone. The AFLB's Fourier split still sees
    one tile.
    ``progress(n)`` is called after each tile's forward with the number of forwards, n.
    """
    _, _, h, w = x.shape
    if tile < 0:
        raise ValueError(f"tile must be non-negative, got {tile}")
    if stat_passes < 0:
        raise ValueError(f"stat_passes must be non-negative, got {stat_passes}")
    if tile == 0 or (h <= tile and w <= tile):
        out = model(x, prior=prior).to(x.dtype)
        return out.clamp(0.0, 1.0) if clamp else out
    m = model.config.pad_multiple
    tile = max(m, tile // m * m)
    overlap = -(-(default_overlap(model.config, tile) if overlap is None else overlap) // m) * m
    if not 0 <= overlap < tile:
        raise ValueError(f"tile_overlap ({overlap}) must be non-negative and smaller than tile ({tile})")
    prior, task_prompt = model.shared_inputs(x, prior)
    # A padded copy only when the image needs padding: whole-image buffers count against the memory
    # budget (image_bytes).
    image = F.pad(x, (0, -w % m, 0, -h % m), mode="replicate") if (h % m or w % m) else x
    rows, cols = (list(zip(blend_windows(size, tile, overlap, x), tile_cores(size, tile, overlap, m)))
                  for size in image.shape[-2:])
    statistics = TileStatistics(image.shape[-2:], share_maps=share_latent)
    out = torch.zeros_like(image)
    forwards = (stat_passes + 1) * len(rows) * len(cols)
    for output_pass in [False] * stat_passes + [True]:
        for (top, row_weight), row_core in rows:
            for (left, col_weight), col_core in cols:
                window = image[:, :, top:top + tile, left:left + tile]
                with statistics.tile((top, left), window.shape[-2:], row_core, col_core, gather=not output_pass):
                    y = model(window, prior=prior, task_prompt=task_prompt)
                if output_pass:
                    weight = row_weight[:, None] * col_weight[None, :]
                    out[:, :, top:top + tile, left:left + tile] += y.to(x.dtype) * weight
                if progress is not None:
                    progress(forwards)
        statistics.next_pass()
    out = out[:, :, :h, :w]
    return out.clamp_(0.0, 1.0) if clamp else out  # in place: no second whole-image buffer


def tile_cores(size: int, tile: int, overlap: int, multiple: int = 1) -> list[tuple[int, int]]:
    """The core [start, stop) of each window of :func:`blend_windows` along one axis, in the
    window's own pixels: the pixels closer to its centre than to its neighbours', split at the
    middle of each shared stretch rounded down to ``multiple``. The cores partition [0, size)."""
    starts = _starts(size, tile, overlap)
    n = min(tile, size)
    bounds = [0] + [(nxt + start + n) // 2 // multiple * multiple for start, nxt in zip(starts, starts[1:])] + [size]
    return [(lo - start, hi - start) for start, lo, hi in zip(starts, bounds, bounds[1:])]


def blend_windows(size: int, tile: int, overlap: int, like: torch.Tensor | None = None
                  ) -> list[tuple[int, torch.Tensor]]:
    """(offset, weights (min(tile, size),)) for each window covering [0, size) along one axis.

    Each window's raw weight is 1 except over the pixels it shares with a neighbour, where it
    rises as a raised cosine, sin²(π/2 · (i + ½) / n) over the n shared pixels; dividing by the
    sum over windows makes the weights a partition of unity (they add up to 1 at every pixel),
    and the raw weights being > 0 keeps that division safe. Two neighbours overlapping by
    exactly ``overlap`` cross-fade as sin² + cos² = 1, so the division only matters where the
    last window, flush with the end, overlaps more. In ``like``'s dtype and device (float64 CPU
    without it).
    """
    like = torch.empty(0, dtype=torch.float64) if like is None else like
    starts = _starts(size, tile, overlap)
    n = min(tile, size)
    i = torch.arange(n, dtype=torch.float64)
    raw = []
    for k, start in enumerate(starts):
        weight = torch.ones(n, dtype=torch.float64)
        if k > 0:  # shared with the previous window: [start, previous end)
            shared = starts[k - 1] + n - start
            weight[:shared] = torch.sin(torch.pi / 2 * (i[:shared] + 0.5) / shared) ** 2
        if k + 1 < len(starts):  # shared with the next window: [next start, start + n)
            shared = start + n - starts[k + 1]
            weight[n - shared:] = torch.sin(torch.pi / 2 * (i[:shared].flip(0) + 0.5) / shared) ** 2
        raw.append(weight)
    total = torch.zeros(size, dtype=torch.float64)
    for start, weight in zip(starts, raw):
        total[start:start + n] += weight
    return [(start, (weight / total[start:start + n]).to(like.dtype).to(like.device))
            for start, weight in zip(starts, raw)]


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    """Window offsets covering [0, size): stride tile − overlap, the last flush with the end."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]


def receptive_radius(config) -> int:
    """How far (input pixels) the network's convolutions see around an output pixel.

    Each k×k convolution working at 1/s of the input resolution widens the view by (k // 2)·s
    pixels on each side: the 3×3 patch embedding and output conv (s = 1), per transformer block
    its two depthwise 3×3s (MDTA, GDFN) at the level's scale s = 2^(l−1), the 3×3 before each
    down- and upsampling, per MCDB its depthwise 3×3 and the Mamba branch's causal conv
    (d_conv − 1 steps along a row) at s = 8, per AFLB its image 3×3, its query and key/value
    depthwise 3×3s and its spatial-gate k×k at the scale of the features it refines. Channel
    attention, the AFLB's pooling, its Fourier filter and the Mamba scan are global and not
    counted: no overlap makes tiles exact for those (:func:`restore_tensor` shares the first two
    across the tiles instead).
    """
    c = config
    radius = 1 + 1  # patch embedding, output conv
    radius += 2 * c.refinement_blocks
    for level in (1, 2, 3):
        s = 2 ** (level - 1)
        radius += 2 * s * (c.enc_blocks[level - 1] + c.dec_blocks[level - 1])
        radius += s  # downsampling conv
        incoming = 2 * s  # decoder level l refines and upsamples features of level l + 1
        radius += incoming * (1 + 1 + 1 + c.aflb_spatial_kernel // 2)  # AFLB: image conv, q, kv, gate
        radius += incoming  # upsampling conv
    radius += 8 * c.latent_blocks * (1 + c.mamba_d_conv - 1)
    return radius


def default_overlap(config, tile: int) -> int:
    """Tile overlap for ``tile``: the receptive radius of :func:`receptive_radius`, at most a
    quarter of the tile (beyond that the extra work, (tile / (tile − overlap))², outgrows 1.8×),
    rounded down to the network's padding multiple so tiles stay aligned with its downsampling."""
    m = config.pad_multiple
    return max(m, min(receptive_radius(config), tile // 4) // m * m)


# Peak memory of one float32 forward pass per (padded) input pixel, as BASE + PER_CHANNEL · dim: a
# line through the largest peak-RSS-per-pixel measured for M2RestoreConfig.tiny() (dim 8, ~2150 B)
# and .paper() (dim 48, ~12970 B) on a CPU, rounded up to cover both (bench/test_bench_memory.py
# measures them, bench/RESULTS.md has the numbers). The activations scale with the channel width;
# the DA-CLIP prior, which sees a fixed 224×224 resize, is not included.
BYTES_PER_PIXEL_BASE = 256
BYTES_PER_PIXEL_PER_CHANNEL = 280
# Without --max-memory: this fraction of the memory the system has available, and at most
# DEFAULT_BUDGET_CAP, so a big photo is tiled before it crowds out everything else.
DEFAULT_BUDGET_FRACTION = 0.5
DEFAULT_BUDGET_CAP = 3 << 29  # 1.5 GiB
# Peak memory of the latent stage run on a whole 1/8-resolution map, per pixel of that map and per
# channel: the largest measured for tiny() and paper() on a CPU (116 B, 64 × 64 map of paper(); 88-100 B
# for tiny(); bench/RESULTS.md) plus the two maps tiles sharing it keep (gathered input and result),
# rounded up.
LATENT_BYTES_PER_CHANNEL = 128
# Whole-image buffers of restore_file per padded pixel besides the activations (bench/RESULTS.md,
# "--max-memory"): while tiles run, the float32 input, the padded copy when the size is not a multiple
# of pad_multiple and the blend accumulator (12 B each); while the output is encoded, the result, its
# clipped copy, the stacked channels and the 8-bit samples (39 B); rounded up for the decoder's copies
# the allocator keeps.
IMAGE_BYTES_PER_PIXEL = 48


def working_set_bytes(config, h: int, w: int) -> int:
    """Estimated peak memory (bytes) of restoring an H×W image whole with a ``config`` network."""
    m = config.pad_multiple
    pixels = -(-h // m) * m * (-(-w // m) * m)
    return pixels * _bytes_per_pixel(config)


def _bytes_per_pixel(config) -> int:
    return BYTES_PER_PIXEL_BASE + BYTES_PER_PIXEL_PER_CHANNEL * config.dim


def available_memory() -> int | None:
    """Bytes the system can give without swapping (psutil, else /proc/meminfo), None if unknown."""
    try:
        import psutil
    except ImportError:
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None
    return int(psutil.virtual_memory().available)


def default_memory_budget() -> int:
    """The working-set budget without ``--max-memory``: DEFAULT_BUDGET_FRACTION of the available
    memory, at most DEFAULT_BUDGET_CAP (the cap alone when the available memory is unknown)."""
    available = available_memory()
    if available is None:
        return DEFAULT_BUDGET_CAP
    return min(int(available * DEFAULT_BUDGET_FRACTION), DEFAULT_BUDGET_CAP)


def latent_map_bytes(config, h: int, w: int) -> int:
    """Estimated memory (bytes) of running the latent stage on the whole 1/8-resolution map of an
    H×W image, as tiles sharing it do (:func:`restore_tensor`): LATENT_BYTES_PER_CHANNEL per
    bottleneck pixel and channel."""
    return -(-h // 8) * -(-w // 8) * config.channels(4) * LATENT_BYTES_PER_CHANNEL


def image_bytes(config, h: int, w: int) -> int:
    """Estimated memory (bytes) of the whole-image buffers :func:`restore_file` holds for an H×W
    image besides the network's activations: IMAGE_BYTES_PER_PIXEL per padded pixel, plus the task
    prompt's first stride-3 convolution on the whole image (its output and activation, ``prompt_hidden``
    float32 channels at 1/9 of the pixels)."""
    m = config.pad_multiple
    pixels = -(-h // m) * m * (-(-w // m) * m)
    return pixels * IMAGE_BYTES_PER_PIXEL + -(-pixels // 9) * 2 * 4 * config.prompt_hidden


def weight_bytes(model) -> int:
    """Bytes of ``model``'s parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


class MemoryEstimate(NamedTuple):
    """Estimated peak memory (bytes) of one :func:`restore_file` run above the process baseline, by
    what holds it: the model's ``weights``, the whole-image buffers (``image``, :func:`image_bytes`),
    the whole latent map tiles share (``latent``, 0 when they do not) and one forward's activations
    (``forward``: the whole image's or one tile's, :func:`working_set_bytes`, which include the blocks
    the allocator keeps). ``total`` is what ``--max-memory`` bounds."""

    weights: int
    image: int
    latent: int
    forward: int

    @property
    def total(self) -> int:
        return self.weights + self.image + self.latent + self.forward


class TilePlan(NamedTuple):
    """How :func:`restore_file` restores an image: ``tile`` 0 whole, else in tiles of that size
    with ``stat_passes`` gathering passes, sharing the latent stage across them when
    ``share_latent`` (never without a gathering pass or whole); ``memory`` is its estimated peak."""

    tile: int
    stat_passes: int
    share_latent: bool
    memory: MemoryEstimate


def plan_restore(config, h: int, w: int, budget: int, weights: int = 0, tile: int = 0,
                 stat_passes: int = DEFAULT_STAT_PASSES) -> TilePlan:
    """How to restore an H×W image with a ``config`` network of ``weights`` bytes within ``budget``
    bytes above the process baseline (:class:`MemoryEstimate`). Whole when everything fits; else the
    tiles share the latent stage when its whole map takes at most half of what the weights and
    whole-image buffers leave, and ``tile`` 0 picks the largest tile (a multiple of the padding
    multiple, at least 4 of them) whose forward fits the rest. A ``budget`` below what the smallest
    tile needs gives that tile, and ``memory.total`` above the budget."""
    m = config.pad_multiple
    fixed = weights + image_bytes(config, h, w)
    whole = MemoryEstimate(weights, fixed - weights, 0, working_set_bytes(config, h, w))
    if tile == 0 and whole.total <= budget:
        return TilePlan(0, stat_passes, False, whole)
    latent = latent_map_bytes(config, h, w)
    share = stat_passes > 0 and latent <= (budget - fixed) // 2
    latent = latent if share else 0
    if tile == 0:
        side = int((max(0, budget - fixed - latent) / _bytes_per_pixel(config)) ** 0.5) // m * m
        tile = max(4 * m, side)
    if max(h, w) <= tile:
        return TilePlan(0, stat_passes, False, whole)
    padded = (-(-h // m) * m, -(-w // m) * m)
    forward = working_set_bytes(config, min(tile, padded[0]), min(tile, padded[1]))
    return TilePlan(tile, stat_passes, share, MemoryEstimate(weights, fixed - weights, latent, forward))


def restore_file(model, src: Path, dst: Path, device: torch.device, precision: str = "fp32", tile: int = 0,
                 overlap: int | None = None, max_memory: int | None = None, progress=None,
                 stat_passes: int = DEFAULT_STAT_PASSES) -> TilePlan:
    """Restore the image file ``src`` into ``dst`` (format by its extension) with ``model`` on
    ``device`` at ``precision``; ``dst`` keeps ``src``'s alpha, bit depth, grayscale-ness, EXIF
    and ICC profile. The image is restored whole or in tiles as :func:`plan_restore` plans within
    ``max_memory`` bytes above the process baseline (default :func:`default_memory_budget`);
    ``tile`` > 0 asks for that tile. ``progress`` and ``stat_passes`` go to :func:`restore_tensor`.
    Returns the plan (with its memory estimate, which may exceed the budget when even the smallest
    tile does not fit).

    Unreadable files raise :class:`m2restore.data.io.UnreadableImageError`.
    """
    from .data.io import read_image, write_image

    image = read_image(src)
    h, w = image.rgb.shape[:2]
    budget = default_memory_budget() if max_memory is None else max_memory
    plan = plan_restore(model.config, h, w, budget, weight_bytes(model), tile, stat_passes)
    x = torch.from_numpy(image.rgb).permute(2, 0, 1)[None].to(device)
    with autocast(device, precision):
        y = restore_tensor(model, x, plan.tile, overlap, progress=progress, stat_passes=plan.stat_passes,
                           share_latent=plan.share_latent)
    del x  # with image.rgb replaced, the input's buffer is free for encoding (image_bytes counts on it)
    image.rgb = y[0].permute(1, 2, 0).cpu().numpy()
    write_image(dst, image)
    return plan
