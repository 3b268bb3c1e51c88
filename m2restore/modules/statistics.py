"""Reductions over all the pixels of a feature map, and how the tiles of one image share them.

Three kinds of block reduce a feature map over its pixels: channel attention (MDTA and the AFLB's
cross-attentions) takes the cosine similarity of every pair of q and k channels over the pixels
(:func:`normalized_gram`), and the AFLB pools its image features into thresholds and its channel
gate (:func:`pixel_mean`, :func:`pixel_amax`). The latent stage goes further: its Mamba scans carry
a state along the rows of the whole map, so each output pixel may depend on all of them
(:func:`whole_map`). Run on a tile, all of these would see that tile's pixels only, and the tile's
output would drift from the whole image's (on real photos, by more than the network changes them).

:class:`TileStatistics` gathers them over the tiles of one image. Each tile contributes the pixels
of its *core* (the part of it closer to its own centre than to any neighbour's, so the cores of all
tiles partition the image, and every core pixel lies at least half an overlap from the tile's edge,
where its features match the whole image's). The partial sums and maxima of all cores add up to
the statistic of the whole image, and the cores of a map put together make the whole map. Inside a
tile's forward, a reduction contributes its core's part and returns the whole-image total of the
previous pass over the tiles (its own part in the first pass); a whole-map function returns the
tile's window of the function of the previous pass's whole map. A statistic that depends on an
earlier one becomes exact one pass after that one does, so a few passes bring every shared
quantity close to the whole image's (docs/design.md#tiling). Outside :meth:`TileStatistics.tile`
the functions are the plain whole-map operations.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Callable, Iterator

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


def whole_map(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """fn(x) for a map x (B, C, H, W) and an ``fn`` -> (B, C', H, W) whose every output pixel may
    depend on every input pixel (a scan along the rows). Within a tiled forward that shares such
    maps, ``fn`` runs on the whole image's map, assembled from the tiles' cores in the previous pass,
    and the tile gets its window of the result."""
    active = _ACTIVE.get()
    if active is None or not active.share_maps:
        return fn(x)
    return active.whole_map(x, fn)


@dataclass
class _AssembledMap:
    """A map put together from the cores of a pass's tiles; ``result`` is fn of it, computed when
    the next pass's first tile asks for it (``assembled`` is then dropped)."""

    assembled: torch.Tensor | None
    result: torch.Tensor | None = None


class TileStatistics:
    """The pixel reductions (and, with ``share_maps``, the :func:`whole_map` results) of one
    ``image_size`` (H, W) image's forward, gathered over its tiles in passes.

    For each pass: run every tile's forward inside :meth:`tile`, then call :meth:`next_pass`. The
    reductions of a forward are matched across tiles by their order, which every tile shares.
    """

    def __init__(self, image_size: tuple[int, int], share_maps: bool = True):
        self.image_size = tuple(image_size)
        self.share_maps = share_maps
        self._previous: list | None = None
        self._gathered: list = []
        self._calls = 0
        self._gather = True
        self._tile: tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]] | None = None

    @contextlib.contextmanager
    def tile(self, origin: tuple[int, int], size: tuple[int, int], rows: tuple[int, int],
             cols: tuple[int, int], gather: bool = True) -> Iterator[None]:
        """Within this context, the forward is that of the tile of ``size`` (h, w) input pixels at
        ``origin`` (top, left) in the image, whose core is ``rows`` × ``cols`` ([start, stop) in tile
        pixels). Origin, size and core are multiples of the coarsest feature map's stride. Without
        ``gather`` (the output pass, which no pass follows) the tile only uses what earlier passes
        gathered."""
        if _ACTIVE.get() is not None:
            raise RuntimeError("tiled forwards cannot nest: one TileStatistics is already gathering")
        self._tile, self._calls, self._gather = (origin, size, rows, cols), 0, gather
        token = _ACTIVE.set(self)
        try:
            yield
        finally:
            _ACTIVE.reset(token)
        if self._previous is not None and self._calls != len(self._previous):
            raise RuntimeError(f"a tile made {self._calls} pixel reductions where the previous pass made "
                               f"{len(self._previous)}: every tile's forward must reduce alike")

    def next_pass(self) -> None:
        """What this pass gathered becomes what the next pass's tiles use."""
        self._previous, self._gathered = self._gathered, []

    def _stride(self, h: int, w: int) -> int:
        _, (tile_h, tile_w), _, _ = self._tile
        if tile_h % h or tile_w % w or tile_h // h != tile_w // w:
            raise ValueError(f"a {h}×{w} feature map does not evenly subsample the {tile_h}×{tile_w} tile")
        return tile_h // h

    def core_mask(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """(h, w) bool, True on the core of the current tile for a feature map of h × w pixels."""
        stride = self._stride(h, w)
        _, _, rows, cols = self._tile
        mask = torch.zeros(h, w, dtype=torch.bool, device=device)
        mask[rows[0] // stride:rows[1] // stride, cols[0] // stride:cols[1] // stride] = True
        return mask

    def exchange(self, parts: tuple[torch.Tensor, ...], ops: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
        """Add this tile's partial reductions ``parts`` (combined by ``ops``, "sum" or "max") into
        the pass's totals; return the previous pass's totals for them (``parts`` in the first pass)."""
        index = self._next_call(tuple)
        if self._gather and index == len(self._gathered):
            self._gathered.append(tuple(p.detach().clone() for p in parts))
        elif self._gather:
            self._gathered[index] = tuple(total + p if op == "sum" else torch.maximum(total, p)
                                          for total, p, op in zip(self._gathered[index], parts, ops))
        return parts if self._previous is None else self._previous[index]

    def whole_map(self, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Put this tile's core of ``x`` (B, C, h, w) into the pass's whole map; return the tile's
        window of fn(the previous pass's whole map) (fn(x) in the first pass)."""
        index = self._next_call(_AssembledMap)
        (top, left), _, rows, cols = self._tile
        b, c, h, w = x.shape
        s = self._stride(h, w)
        top, left = top // s, left // s
        if self._gather:
            if index == len(self._gathered):
                height, width = self.image_size
                self._gathered.append(_AssembledMap(x.new_zeros(b, c, height // s, width // s)))
            r0, r1, c0, c1 = rows[0] // s, rows[1] // s, cols[0] // s, cols[1] // s
            self._gathered[index].assembled[:, :, top + r0:top + r1, left + c0:left + c1] = x[:, :, r0:r1, c0:c1]
        if self._previous is None:
            return fn(x)
        whole = self._previous[index]
        if whole.result is None:
            token = _ACTIVE.set(None)  # fn sees the whole map: its own reductions are whole already
            try:
                whole.result = fn(whole.assembled)
            finally:
                _ACTIVE.reset(token)
            whole.assembled = None
        return whole.result[:, :, top:top + h, left:left + w]

    def _next_call(self, kind: type) -> int:
        index, self._calls = self._calls, self._calls + 1
        if index < len(self._gathered) and not isinstance(self._gathered[index], kind):
            raise RuntimeError("a tile's pixel reductions came in another order than the first tile's: every "
                               "tile's forward must reduce alike")
        if self._previous is not None and index >= len(self._previous):
            raise RuntimeError("a tile made more pixel reductions than the previous pass: every tile's "
                               "forward must reduce alike")
        return index
