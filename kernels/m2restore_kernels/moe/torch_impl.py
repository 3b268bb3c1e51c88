"""PyTorch path of the MoE ops (C loops from ``native_impl`` where the resolver picked "native").

Both sparse paths share one dispatch plan: the K*P (row, slot) assignments are sorted once by
expert (stable, so each expert's rows stay in row order) and each expert then works on one
contiguous segment of that order; the forward keeps the plan for the backward. This path sorts
with ``torch.sort`` and runs the expert MLPs in cache-sized row chunks on a CPU.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native_impl
from .reference import GATED_ACTIVATIONS, PLAIN_ACTIVATIONS, hidden


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16-bit and float32 compute, float64 for float64: sums never run below float32
    nor below the inputs' own precision."""
    return torch.promote_types(dtype, torch.float32)


def sort_assignments(indices: Tensor, n_experts: int):
    """Sort the K*P assignments by expert: (order (K*P,), offsets (N+1,)), both int64.

    Assignment a = k*P + p (slot-major), so per-assignment buffers viewed as (K, P, C) combine
    with contiguous elementwise ops over whole (P, C) slabs."""
    # int16 keys where they fit: CPU sorts them 4x faster than int64 and single-threaded (the int64
    # stable sort runs threaded, which stalls for tens of ms on a contended CPU).
    key = torch.int16 if n_experts < 2**15 else torch.int64
    experts, order = torch.sort(indices.t().reshape(-1).to(key), stable=True)
    # searchsorted rather than bincount: no host sync (bincount sizes its output from the data).
    offsets = torch.searchsorted(experts, torch.arange(n_experts + 1, dtype=key, device=indices.device))
    return order, offsets


def topk_softmax_fwd(logits: Tensor, k: int, native: bool = False):
    """logits (P, N) -> (weights (P, k) in logits' dtype, indices (P, k) int64); ``native``: the C loop.
    Selection and softmax in the logits' own dtype, in ``topk_softmax``'s order (NaN above +inf,
    ties to the lower index)."""
    if native:
        return native_impl.topk_softmax_fwd(logits, k)
    # K rounds of "take the max" (as the Triton kernel). NaN compares false with everything, so it
    # takes part as +inf and wins among the maxima by its own flag; among equal candidates the lowest
    # free column wins (argmax returns the first maximum), which settles ties and repeated -inf alike.
    nan = logits.isnan()
    key = logits.masked_fill(nan, float("inf"))
    free = torch.ones_like(logits, dtype=torch.bool)
    idxs = []
    for _ in range(k):
        cand = key.masked_fill(~free, float("-inf"))
        hit = free & (cand == cand.amax(dim=1, keepdim=True))
        hit_nan = hit & nan
        hit = torch.where(hit_nan.any(dim=1, keepdim=True), hit_nan, hit)
        i = hit.to(torch.uint8).argmax(dim=1, keepdim=True)
        free.scatter_(1, i, False)
        idxs.append(i)
    indices = torch.cat(idxs, 1)
    return torch.softmax(logits.gather(1, indices), dim=1), indices


def topk_softmax_bwd(grad_weights: Tensor, weights: Tensor, indices: Tensor, n: int) -> Tensor:
    """d logits (P, n) in weights' dtype, computed in float32 or wider; zero for the logits that
    were not kept."""
    dlogits = torch.zeros(weights.shape[0], n, dtype=weights.dtype, device=weights.device)
    acc = accumulation_dtype(weights.dtype)
    g, w = grad_weights.to(acc), weights.to(acc)
    d = w * (g - (w * g).sum(1, keepdim=True))
    return dlogits.scatter_(1, indices, d.to(dlogits.dtype))


def _combine(out: Tensor, weights: Tensor, combine: str, native: bool) -> Tensor:
    """out (K, P, C) in the accumulation dtype, weights (P, K) -> y (P, C) in out's dtype (the C
    loop takes float32 only)."""
    if native:
        return native_impl.combine_fwd(out, weights, combine)
    # Fused two-operand ops over whole (P, C) slabs: on CPU this is several times faster than a
    # reduction over the K axis (torch.logsumexp adds extra passes for its inf handling).
    w = weights.to(out.dtype).t().unsqueeze(-1)
    if combine == "sum":
        y = out[0] * w[0]
        for k in range(1, out.shape[0]):
            y.addcmul_(out[k], w[k])
        return y
    log_w = w.log()
    y = out[0] + log_w[0]
    for k in range(1, out.shape[0]):
        y = torch.logaddexp(y, out[k] + log_w[k])
    return y


HIDDEN_MULTIPLE = 16


def _pad_hidden(w1, b1, w2, blocks: int, multiple: int = HIDDEN_MULTIPLE):
    """Zero-pad the hidden width Hd to a multiple of ``multiple``: CPU BLAS (MKL) runs GEMMs with an
    odd output width (127, 255, 510) several times slower (bench/RESULTS.md). w1's columns are
    ``blocks`` blocks of Hd (2 for gated experts: [gate | up]), each padded on its own. Padded units
    see zero weights and bias, so they are act(0) = 0 (act(0) * 0 gated) and meet zero rows of w2."""
    Hd = w2.shape[1]
    pad = -Hd % multiple
    if pad == 0:
        return w1, b1, w2

    def pad_blocks(t):
        return None if t is None else F.pad(t.unflatten(-1, (blocks, Hd)), (0, pad)).flatten(-2)
    return pad_blocks(w1), pad_blocks(b1), F.pad(w2, (0, 0, 0, pad))


def padded_hidden(Hd: int, activation: str, multiple: int = HIDDEN_MULTIPLE) -> int:
    """The width H1 of the first projection as this path computes it: Hd padded by :func:`_pad_hidden`,
    times the blocks of w1."""
    return hidden_blocks(activation) * (Hd + -Hd % multiple)


def _unpad_hidden(dw1, db1, dw2, blocks: int, Hd: int):
    """The gradients of :func:`_pad_hidden`'s inputs from those of its outputs."""
    padded = dw2.shape[1]
    if padded == Hd:
        return dw1, db1, dw2

    def cut(t):
        return t.unflatten(-1, (blocks, padded))[..., :Hd].flatten(-2)
    return cut(dw1), cut(db1), dw2[:, :Hd]


def _plain_bwd(grad: Tensor, h: Tensor, name: str) -> Tensor:
    if name == "gelu":
        return torch.ops.aten.gelu_backward(grad, h)
    if name == "silu":
        return torch.ops.aten.silu_backward(grad, h)
    return grad * (h > 0)


def _act_bwd(grad: Tensor, h: Tensor, activation: str) -> Tensor:
    """d loss / d h from d loss / d act(h)."""
    gated = GATED_ACTIVATIONS.get(activation)
    if gated is None:
        return _plain_bwd(grad, h, activation)
    gate, up = h.chunk(2, dim=-1)
    return torch.cat([_plain_bwd(grad * up, gate, gated), grad * PLAIN_ACTIVATIONS[gated](gate)], dim=-1)


_INPLACE = {"gelu": torch.ops.aten.gelu_, "silu": torch.ops.aten.silu_, "relu": torch.ops.aten.relu_}


def _hidden_in_place(h: Tensor, activation: str) -> Tensor:
    """:func:`reference.hidden` overwriting ``h`` (a forward temporary nobody keeps): no allocation
    and one pass less over the (rows, H1) block. Gated: the result is a strided view of h's gate
    half, which BLAS reads as it lies."""
    gated = GATED_ACTIVATIONS.get(activation)
    if gated is None:
        return _INPLACE[activation](h)
    gate, up = h.chunk(2, dim=-1)
    return _INPLACE[gated](gate).mul_(up)


def hidden_blocks(activation: str) -> int:
    """How many Hd-wide blocks w1's hidden columns hold: 2 ([gate | up]) for gated experts."""
    return 2 if activation in GATED_ACTIVATIONS else 1


def _segments(offsets: Tensor):
    """(expert, first, end) of every expert that has rows in the sorted order."""
    bounds = offsets.tolist()
    return [(e, lo, hi) for e, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])) if hi > lo]


def _inverse(order: Tensor) -> Tensor:
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def _linear(x: Tensor, w: Tensor, b: Optional[Tensor], out: Optional[Tensor] = None) -> Tensor:
    return torch.mm(x, w, out=out) if b is None else torch.addmm(b, x, w, out=out)


# A CPU runs an expert's rows in chunks whose (rows, hidden) activation stays in cache between the
# GEMM that writes it and the one that reads it; the budget is in bytes per thread (each thread's
# share of the chunk is what must stay near it: at 2 threads, 4 MiB chunks ran the Mixtral block's
# forward 13% faster than 2 MiB ones and left DDER's as it was), with a floor on the rows because
# bf16 GEMMs on a CPU want tall operands (bench/RESULTS.md).
ROW_CHUNK_BYTES = 1 << 21
MIN_ROW_CHUNK = 256


def _row_chunks(lo: int, hi: int, hidden: int, like: Tensor):
    """[lo, hi) cut, on a CPU, into equal chunks of at most about ROW_CHUNK_BYTES per thread of
    hidden activation (at least MIN_ROW_CHUNK rows): equal, so no short tail chunk runs its GEMMs at a
    fraction of their speed (a Mixtral expert's 530 rows are 265 + 265, not 512 + 18). A GPU gets
    the whole segment: there chunks would only multiply the launches."""
    if like.device.type != "cpu":
        rows = max(1, hi - lo)
    else:
        budget = ROW_CHUNK_BYTES * torch.get_num_threads()
        most = max(MIN_ROW_CHUNK, budget // (hidden * like.element_size()))
        pieces = max(1, -(-(hi - lo) // most))
        rows = max(1, -(-(hi - lo) // pieces))
    return ((s, min(s + rows, hi)) for s in range(lo, hi, rows))


def _cast(dtype: torch.dtype, *tensors):
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def moe_mlp_fwd(x, weights, indices, w1, b1, w2, b2, combine, dtype, activation: str = "gelu",
                native: bool = False, save_hidden: bool = False):
    """-> (y (P, C) dtype, expert outputs (K*P, C) dtype, order (K*P,), offsets (N+1,), hpre); GEMMs
    in ``dtype``; ``native``: the K-way combination in C. w1 (N, C, H1) and w2 (N, Hd, C) in any
    strides (BLAS takes transposed operands as they are). ``hpre`` (K*P, padded_hidden) dtype: the
    first projection x @ w1[e] + b1[e] of every assignment in the plan's order where
    ``save_hidden``, else (0, padded_hidden)."""
    P, K = indices.shape
    w1, b1, w2 = _pad_hidden(*_cast(dtype, w1, b1, w2), hidden_blocks(activation))
    (b2,) = _cast(dtype, b2)
    order, offsets = sort_assignments(indices, w1.shape[0])
    tokens = order % P
    # GEMM2 writes straight into its expert's slice of the sorted order; one row gather then
    # restores (K, P) order. Per-expert row scatters (index_copy_, index_add_) are far slower on CPU.
    out = native_impl.empty(K * P, w2.shape[2], dtype=dtype, device=x.device)
    hpre = native_impl.empty(K * P if save_hidden else 0, w1.shape[2], dtype=dtype, device=x.device)
    for e, lo, hi in _segments(offsets):
        b1e, b2e = (None if b is None else b[e] for b in (b1, b2))
        for s, t in _row_chunks(lo, hi, w1.shape[2], w1):
            xe = x.index_select(0, tokens[s:t]).to(dtype)
            if save_hidden:
                h = hidden(_linear(xe, w1[e], b1e, out=hpre[s:t]), activation)
            else:
                h = _hidden_in_place(_linear(xe, w1[e], b1e), activation)
            _linear(h, w2[e], b2e, out=out[s:t])
    out = torch.index_select(out, 0, _inverse(order), out=native_impl.empty(*out.shape, dtype=dtype, device=x.device))
    y = _combine(out.view(K, P, x.shape[1]).to(accumulation_dtype(dtype)), weights, combine, native)
    return y.to(dtype), out, order, offsets, hpre


def _combine_bwd(dy, out, weights, combine, native: bool):
    """out (K, P, C) in the accumulation dtype -> (dout (K, P, C), dweights (P, K)), both in out's dtype."""
    if native:
        return native_impl.combine_bwd(dy, out, weights, combine)
    dy, w = dy.to(out.dtype), weights.to(out.dtype).t().unsqueeze(-1)
    if combine == "sum":
        return (dy * w).contiguous(), (out * dy).sum(-1).t()
    # d y / d o_k = w_k exp(o_k - y): one buffer, updated in place (these passes dominate on CPU).
    grad = (out - _combine(out, weights, combine, native)).exp_().mul_(dy)
    dweights = grad.sum(-1).t()
    return grad.mul_(w), dweights


def moe_mlp_bwd(dy, x, weights, order, offsets, w1, b1, w2, out, combine, activation: str = "gelu",
                native: bool = False, hpre: Optional[Tensor] = None):
    """-> grads of (x, weights, w1, b1, w2, b2), each in its input's dtype and the w1 and w2
    gradients in their inputs' strides; GEMMs in out's dtype. ``hpre``: the forward's first
    projection (``moe_mlp_fwd(save_hidden=True)``), or None to recompute it (2 of the 8 GEMM units
    of a gated expert's backward, 1 of 5 for a plain one)."""
    P, K = weights.shape
    w1_in, w2_in = w1, w2  # before the casts below
    Hd, dtype = w2.shape[1], out.dtype
    acc = accumulation_dtype(dtype)
    dout, dweights = _combine_bwd(dy, out.view(K, P, x.shape[1]).to(acc), weights, combine, native)
    blocks = hidden_blocks(activation)
    w1, b1, w2 = _pad_hidden(*_cast(dtype, w1, b1, w2), blocks)
    tokens = order % P
    dout_slots = dout.view(K * P, x.shape[1])
    dout = torch.index_select(dout_slots, 0, order, out=native_impl.empty(
        *dout_slots.shape, dtype=dout_slots.dtype, device=x.device)).to(dtype)
    # Fresh buffers of K*P rows cost more in first-touch page faults than their GEMMs on a small
    # VM (about 1 ms per MB here, bench/RESULTS.md): dx's sorted rows reuse the slot-ordered dout,
    # and its slot order the sorted dout, each free by then.
    dx_sorted = dout_slots if dout_slots.dtype == dtype else torch.empty_like(dout)
    # Parameter gradients sum over row chunks in the accumulation dtype, so 16-bit ones are rounded
    # once, at the end.
    # zeros_like keeps the weights' strides: unpadded float32 nn.Linear weights get their gradient
    # summed in their own (transposed) layout, BLAS writing it there, and returned without a copy.
    sums = dict(dtype=acc)
    dw1, dw2 = torch.zeros_like(w1, **sums), torch.zeros_like(w2, **sums)
    db1 = w1.new_zeros(w1.shape[0], w1.shape[2], **sums)
    db2 = w2.new_zeros(w2.shape[0], w2.shape[2], **sums)
    for e, lo, hi in _segments(offsets):
        for s, t in _row_chunks(lo, hi, w1.shape[2], w1):
            xe, de = x.index_select(0, tokens[s:t]).to(dtype), dout[s:t]
            he = _linear(xe, w1[e], None if b1 is None else b1[e]) if hpre is None else hpre[s:t]
            _add_product(dw2[e], hidden(he, activation).t(), de)
            db2[e] += de.sum(0, **sums)
            dh = _act_bwd(de @ w2[e].t(), he, activation)
            _add_product(dw1[e], xe.t(), dh)
            db1[e] += dh.sum(0, **sums)
            torch.mm(dh, w1[e].t(), out=dx_sorted[s:t])
    dx_slots = torch.index_select(dx_sorted, 0, _inverse(order), out=dout).view(K, P, x.shape[1])
    dx = native_impl.empty(P, x.shape[1], dtype=acc, device=x.device).copy_(dx_slots[0])
    for k in range(1, K):
        dx += dx_slots[k]
    dw1, db1, dw2 = _unpad_hidden(dw1, db1, dw2, blocks, Hd)
    # Gradients in each input's own dtype (autocast's casts are inside the op) and w1's and w2's in
    # their strides (the fake's empty_like: a transposed nn.Linear view gets a transposed gradient,
    # which autograd hands back to the parameter without a copy).
    return (dx.to(x.dtype).contiguous(), dweights.to(weights.dtype).contiguous(), _like(dw1, w1_in),
            db1.to(w1_in.dtype).contiguous(), _like(dw2, w2_in), db2.to(w2_in.dtype).contiguous())


def _add_product(total: Tensor, a: Tensor, b: Tensor):
    """total += a @ b: in place in the GEMM where the dtypes agree (no product buffer, no extra pass),
    else the 16-bit product added to the float32 sum."""
    if total.dtype == a.dtype:
        total.addmm_(a, b)
    else:
        total += a @ b


def _like(grad: Tensor, param: Tensor) -> Tensor:
    """grad in param's dtype and strides (itself where it has them already)."""
    if grad.dtype == param.dtype and grad.stride() == param.stride():
        return grad
    return torch.empty_like(param).copy_(grad)
