"""PSNR and SSIM of a trained model on test sets, laid out like Table I (``m2restore eval``).

Protocol (the paper's, as in TransWeather's evaluation): outputs clamped to [0, 1] and
quantised to 8 bits, as if saved as PNG; PSNR and SSIM on the RGB channels with data range 1
(scikit-image's ``peak_signal_noise_ratio`` and ``structural_similarity`` with its defaults:
7×7 uniform window (smaller for images under 7 pixels), SSIM averaged over channels). The Y-channel numbers (the other common
protocol) use the BT.601 luma of ``rgb2ycbcr``, in [16, 235] with data range 255.

Where the authors' public code (``test.py``, ``utils/val_utils.py``, ``data/dataset.py``) scores
otherwise, ``evaluate_set`` can follow it (docs/design.md#input-range): ``resize`` resizes a set's
input and ground truth as their loader resizes RainDrop (:func:`pil_resize`, 720×480), and
``y_metric="chw-view"`` replaces the Y numbers by theirs (:func:`chw_view_metrics`). Their RGB
numbers do not exist (they report Y only); the RGB row keeps this protocol.
"""
from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .options import DEFAULT_STAT_PASSES, Y_METRICS
from .restore import restore_tensor

METRICS = ("psnr", "ssim", "psnr_y", "ssim_y")
# Luma weights of OpenCV's COLOR_BGR2YCrCb for float images (no offset, [0, 1]), channels in its
# B, G, R order: what their calc_psnr / calc_ssim apply to whatever sits in the last axis.
_BGR_LUMA = np.array([0.114, 0.587, 0.299])


def quantize(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) float -> float64 on the 8-bit grid, as a saved PNG would hold it."""
    return np.rint(np.clip(image, 0.0, 1.0) * 255.0) / 255.0


def image_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """PSNR/SSIM on RGB (data range 1) and on Y of two (H, W, 3) images in [0, 1]."""
    from skimage.color import rgb2ycbcr
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    if pred.shape != gt.shape or pred.ndim != 3 or pred.shape[-1] != 3:
        raise ValueError(f"pred and gt must both be (H, W, 3), got {pred.shape} and {gt.shape}")
    # The 7×7 window shrinks (odd) for images smaller than it; SSIM needs at least 3×3.
    win = min(7, *pred.shape[:2])
    win -= 1 - win % 2
    if win < 3:
        raise ValueError(f"SSIM needs images of at least 3x3 pixels, got {pred.shape[1]}x{pred.shape[0]}")
    pred, gt = pred.astype(np.float64), gt.astype(np.float64)
    y_pred, y_gt = rgb2ycbcr(pred)[..., 0], rgb2ycbcr(gt)[..., 0]
    return {
        "psnr": float(peak_signal_noise_ratio(gt, pred, data_range=1.0)),
        "ssim": float(structural_similarity(gt, pred, data_range=1.0, channel_axis=-1, win_size=win)),
        "psnr_y": float(peak_signal_noise_ratio(y_gt, y_pred, data_range=255.0)),
        "ssim_y": float(structural_similarity(y_gt, y_pred, data_range=255.0, win_size=win)),
    }


def chw_view_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """``psnr_y`` and ``ssim_y`` as the authors' ``utils/val_utils.py`` computes them, of two
    (3, H, W) float images (the network's output as it is: neither clamped nor quantised).

    Each (3, H, W) buffer is read as (H, W, 3), a reshape and not a transpose (their
    ``im[0].view(H, W, 3)``), so each "pixel" holds three neighbours along a row of one colour plane
    and the rows of the result run through the R, then the G, then the B plane. Its luma is
    OpenCV's BGR one, 0.114·c0 + 0.587·c1 + 0.299·c2 in [0, 1]; PSNR with data range 1; SSIM with
    data range 1 and ``channel_axis=-1`` on that 2-D map, which scikit-image takes as W channels of
    length H: a 1-D SSIM (7-sample uniform window) down each column, averaged.
    """
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    if pred.shape != gt.shape or pred.ndim != 3 or pred.shape[0] != 3:
        raise ValueError(f"pred and gt must both be (3, H, W), got {pred.shape} and {gt.shape}")
    _, h, w = pred.shape
    if h < 7:
        raise ValueError(f"the column-wise SSIM needs images of at least 7 rows, got {h}")
    y_pred, y_gt = (np.ascontiguousarray(a, dtype=np.float64).reshape(h, w, 3) @ _BGR_LUMA for a in (pred, gt))
    return {"psnr_y": float(peak_signal_noise_ratio(y_gt, y_pred, data_range=1.0)),
            "ssim_y": float(structural_similarity(y_gt, y_pred, data_range=1.0, channel_axis=-1))}


def pil_resize(image: "torch.Tensor", size: tuple[int, int]) -> "torch.Tensor":
    """(3, H, W) float in [0, 1] -> (3, h, w) for ``size`` = (w, h), as the authors' loader resizes:
    PIL's ``Image.resize`` with its default filter for RGB (bicubic) on the 8-bit image."""
    import torch
    from PIL import Image

    samples = np.rint(image.permute(1, 2, 0).numpy().clip(0.0, 1.0) * 255.0).astype(np.uint8)
    resized = np.asarray(Image.fromarray(samples).resize(size, Image.Resampling.BICUBIC))
    return torch.from_numpy(resized.astype(np.float32) / 255.0).permute(2, 0, 1).contiguous()


@dataclass
class SetResult:
    """Mean metrics over one test set of ``count`` images."""

    name: str
    count: int
    psnr: float
    ssim: float
    psnr_y: float
    ssim_y: float


def evaluate_set(model, dataset, name: str, device, tile: int = 0, overlap: int | None = None,
                 limit: int | None = None, progress: bool = True, stat_passes: int = DEFAULT_STAT_PASSES,
                 resize: tuple[int, int] | None = None, y_metric: str = "ycbcr") -> SetResult:
    """Restore every pair of ``dataset`` (items with whole-image ``input``/``gt`` tensors, and
    cached priors ``d_g``/``P_f`` when it has them) and average the per-image metrics; ``tile``,
    ``overlap`` and ``stat_passes`` go to :func:`~m2restore.restore.restore_tensor`.
    ``resize`` (w, h): input and ground truth go through :func:`pil_resize` first; ``y_metric``
    (one of :data:`Y_METRICS`): ``"chw-view"`` scores Y with :func:`chw_view_metrics` on the
    unclamped output.

    In a process group (:func:`m2restore.distributed.init`, e.g. under torchrun) each process
    restores the images i ≡ rank (mod W), and every process returns the means over all of them,
    taken in image order as one process takes them."""
    from tqdm import tqdm

    from . import distributed

    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n == 0:
        raise ValueError(f"test set {name!r} is empty")
    if y_metric not in Y_METRICS:
        raise ValueError(f"y_metric must be one of {Y_METRICS}, got {y_metric!r}")
    rows = []
    mine = range(distributed.rank(), n, distributed.world_size())
    for i in tqdm(mine, desc=f"eval {name}", unit="img", disable=not progress, leave=False):
        item = dataset[i]
        prior = (item["d_g"][None].to(device), item["P_f"][None].to(device)) if "d_g" in item else None
        x, gt = (item["input"], item["gt"]) if resize is None else (pil_resize(item["input"], resize),
                                                                    pil_resize(item["gt"], resize))
        out = restore_tensor(model, x[None].to(device), tile, overlap, prior, stat_passes=stat_passes,
                             clamp=y_metric == "ycbcr")[0].float().cpu()
        row = image_metrics(quantize(out.permute(1, 2, 0).numpy()), gt.permute(1, 2, 0).numpy())
        if y_metric == "chw-view":
            row.update(chw_view_metrics(out.numpy(), gt.numpy()))
        rows.append((i, row))
    rows = sorted((row for share in distributed.gather_objects(rows) for row in share), key=lambda row: row[0])
    return SetResult(name, n, **{m: float(np.mean([r[m] for _, r in rows])) for m in METRICS})


def average(results: list[SetResult]) -> SetResult:
    """Unweighted mean over sets, as Table I's "Average" column."""
    return SetResult("Average", sum(r.count for r in results),
                     **{m: float(np.mean([getattr(r, m) for r in results])) for m in METRICS})


def format_table(results: list[SetResult], title: str = "") -> str:
    """Table I layout: one column pair (PSNR↑ SSIM↑) per set and the average; rows RGB and Y."""
    cols = results + ([average(results)] if len(results) > 1 else [])
    width = [max(15, len(r.name) + 2) for r in cols]
    head = "".join(f"{r.name:^{w}}" for r, w in zip(cols, width))
    sub = "".join(f"{'PSNR↑':>7} {'SSIM↑':>6}".center(w) for w in width)
    lines = [title] if title else []
    lines += [f"{'':8}{head}", f"{'':8}{sub}"]
    for label, p, s in (("RGB", "psnr", "ssim"), ("Y", "psnr_y", "ssim_y")):
        cells = "".join(f"{getattr(r, p):>7.2f} {getattr(r, s):>6.3f}".center(w) for r, w in zip(cols, width))
        lines.append(f"{label:8}{cells}")
    lines.append(f"{'images':8}" + "".join(f"{r.count:^{w}}" for r, w in zip(cols, width)))
    return "\n".join(lines)


def save_metrics(results: list[SetResult], out: Path, weights: str | Path,
                 protocol: dict | None = None) -> tuple[Path, Path]:
    """Write ``results`` (and their average when there are several) to ``out/metrics.csv`` and
    ``out/metrics.json`` (which also names ``weights`` and, when given, the scoring ``protocol``,
    e.g. ``{"y_metric": "chw-view", "resize": {"RainDrop": [720, 480]}}``); returns the two paths."""
    rows = results + ([average(results)] if len(results) > 1 else [])
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / "metrics.csv", out / "metrics.json"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["name", "count", *METRICS])
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    extra = {} if protocol is None else {"protocol": protocol}
    json_path.write_text(json.dumps({"weights": str(weights), **extra, "sets": [asdict(r) for r in rows]}, indent=2))
    return csv_path, json_path
