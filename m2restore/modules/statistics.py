"""Reductions over all the pixels of a feature map, and how the tiles of one image share them.

Three kinds of block reduce a feature map over its pixels: channel attention (MDTA and the AFLB's
cross-attentions) takes the cosine similarity of every pair of q and k channels over the pixels
(:func:`normalized_gram`), and the AFLB pools its image features into thresholds and its channel
gate (:func:`pixel_mean`, :func:`pixel_amax`). Run on a tile, they would see that tile's pixels
only, and the tile's output would drift from the whole image's (on real photos, by more than the
network changes them).

:class:`TileStatistics` gathers these reductions over the tiles of one image. Each tile contributes
the pixels of its *core* (the part of it closer to its own centre than to any neighbour's, so the
cores of all tiles partition the image, and every core pixel lies at least half an overlap from the
tile's edge, where its features match the whole image's). The partial sums and maxima of all
cores add up to the statistic of the whole image; a reduction inside a tile's forward contributes
its core's part and returns the whole-image total of the previous pass over the tiles (its own
part in the first pass). A statistic that depends on an earlier one (the next block's attention)
becomes exact one pass after that one does, so a few passes bring every shared statistic close to
the whole image's (measurements: bench/RESULTS.md, tiling). Outside :meth:`TileStatistics.tile`
the functions are the plain whole-map reductions.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch
import torch.nn.functional as F

# The gathering of the tiled forward in progress; a context variable, so that threads (each starts
# with an empty context) restore images side by side without seeing each other's tiles.
_ACTIVE: contextvars.ContextVar[TileStatistics | None] = contextvars.ContextVar("m2restore_tiles", default=None)


def normalized_gram(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """q, k (B, C, H, W) -> (B, heads, C/heads, C/heads), per head the cosine similarity over the
    pixels of each q channel with each k channel (both L2-normalised along the pixels)."""
    b, c, h, w = q.shape
    q, k = (t.reshape(b, heads, c // heads, h * w) for t in (q, k))
    active = _ACTIVE.get()
    if active is None:
        return F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    # Sums of products add up across tiles where normalised vectors do not; they are taken in
    # float32 at least because, over a whole image, they outgrow half precision's range.
    wide = torch.promote_types(q.dtype, torch.float32)
    core = active.core_mask(h, w, q.device).reshape(h * w).to(wide)
    qc, kc = q.to(wide) * core, k.to(wide) * core
    dot, q_sq, k_sq = active.exchange(
        (qc @ kc.transpose(-2, -1), qc.square().sum(-1), kc.square().sum(-1)), ("sum", "sum", "sum"))
    eps = 1e-12  # F.normalize's floor on the norm
    norms = q_sq.sqrt().clamp_min(eps)[..., :, None] * k_sq.sqrt().clamp_min(eps)[..., None, :]
    return (dot / norms).to(q.dtype)


def pixel_mean(x: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) -> (B, C, 1, 1), the mean over the pixels."""
    active = _ACTIVE.get()
    if active is None:
        return x.mean(dim=(2, 3), keepdim=True)
    wide = torch.promote_types(x.dtype, torch.float32)
    core = active.core_mask(*x.shape[-2:], x.device).to(wide)
    total, count = active.exchange(((x.to(wide) * core).sum(dim=(2, 3), keepdim=True), core.sum()),
                                    ("sum", "sum"))
    return (total / count).to(x.dtype)


def pixel_amax(x: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) -> (B, C, 1, 1), the maximum over the pixels."""
    active = _ACTIVE.get()
    if active is None:
        return x.amax(dim=(2, 3), keepdim=True)
    core = active.core_mask(*x.shape[-2:], x.device)
    (largest,) = active.exchange((x.masked_fill(~core, float("-inf")).amax(dim=(2, 3), keepdim=True),), ("max",))
    return largest


class TileStatistics:
    """The pixel reductions of one image's forward, gathered over its tiles in passes.

    For each pass: run every tile's forward inside :meth:`tile`, then call :meth:`next_pass`. The
    reductions of a forward are matched across tiles by their order, which every tile shares.
    """

    def __init__(self):
        self._previous: list[tuple[torch.Tensor, ...]] | None = None
        self._totals: list[tuple[torch.Tensor, ...]] = []
        self._calls = 0
        self._core: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None = None

    @contextlib.contextmanager
    def tile(self, size: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int]) -> Iterator[None]:
        """Within this context, pixel reductions belong to a tile of ``size`` (h, w) input pixels
        whose core is ``rows`` × ``cols`` ([start, stop) in tile pixels, multiples of the coarsest
        feature map's stride)."""
        if _ACTIVE.get() is not None:
            raise RuntimeError("tiled forwards cannot nest: one TileStatistics is already gathering")
        self._core, self._calls = (size, rows, cols), 0
        token = _ACTIVE.set(self)
        try:
            yield
        finally:
            _ACTIVE.reset(token)
        if self._previous is not None and self._calls != len(self._previous):
            raise RuntimeError(f"a tile made {self._calls} pixel reductions where the previous pass made "
                               f"{len(self._previous)}: every tile's forward must reduce alike")

    def next_pass(self) -> None:
        """The totals gathered so far become the statistics the next pass's tiles use."""
        self._previous, self._totals = self._totals, []

    def core_mask(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """(h, w) bool, True on the core of the current tile for a feature map of h × w pixels."""
        (tile_h, tile_w), rows, cols = self._core
        if tile_h % h or tile_w % w or tile_h // h != tile_w // w:
            raise ValueError(f"a {h}×{w} feature map does not evenly subsample the {tile_h}×{tile_w} tile")
        stride = tile_h // h
        mask = torch.zeros(h, w, dtype=torch.bool, device=device)
        mask[rows[0] // stride:rows[1] // stride, cols[0] // stride:cols[1] // stride] = True
        return mask

    def exchange(self, parts: tuple[torch.Tensor, ...], ops: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
        """Add this tile's partial reductions ``parts`` (combined by ``ops``, "sum" or "max") into
        the pass's totals; return the previous pass's totals for them (``parts`` in the first pass)."""
        index, self._calls = self._calls, self._calls + 1
        if index == len(self._totals):
            self._totals.append(tuple(p.detach().clone() for p in parts))
        else:
            self._totals[index] = tuple(total + p if op == "sum" else torch.maximum(total, p)
                                        for total, p, op in zip(self._totals[index], parts, ops))
        if self._previous is None:
            return parts
        if index >= len(self._previous):
            raise RuntimeError("a tile made more pixel reductions than the previous pass: every tile's "
                               "forward must reduce alike")
        return self._previous[index]
