"""Pixel-wise top-K routing and sparse expert MLPs (the DDER of M2Restore).

Two ops, each with a plain reference (``*_ref``), a sparse PyTorch path and a Triton path:

* ``topk_softmax(logits, k) -> (weights, indices)``: softmax over the K largest logits per row
  (or, ``routing="softmax_topk"``, over all N first), optionally with the (K+1)-th logit; the
  balance terms ``noisy_topk_load``, ``importance``, ``router_z_loss`` and ``cv_squared`` beside it.
* ``moe_mlp(x, weights, indices, w1, b1, w2, b2, combine)``: every row runs only its K chosen
  experts ``act(x @ w1[e] + b1[e]) @ w2[e] + b2[e]`` (GELU, SiLU, ReLU, or gated SwiGLU/GeGLU;
  weights stacked or in nn.Linear's layout) and combines them with the gate weights.

Both sparse paths share one dispatch plan: the K*P (row, slot) assignments are sorted once by
expert (stable, so each expert's rows stay in row order) and each expert then works on one
contiguous segment of that order; the forward keeps the plan for the backward. The PyTorch path
sorts with ``torch.sort``; the Triton path with a counting sort of its own (three small kernels, no
host sync), so its whole dispatch can be captured in a CUDA graph. On CPU the PyTorch path runs
the routing and the K-way combination as C loops (``csrc/moe_cpu.c``, float32 inside: float64
keeps PyTorch ops) and the expert MLPs in cache-sized row chunks. The per-assignment expert outputs ``O`` (K*P, C) go to a buffer in the
compute dtype (bf16 under autocast: half the bytes of float32), one row per assignment, and a
separate combine step reduces the K slots in float32. The buffer costs one extra write and read of
K*P*C values but keeps the result deterministic (no atomics), serves ``sum`` and ``logsumexp``
alike, and is exactly what the backward needs (``logsumexp`` gradients and the gate-weight
gradient both need the unweighted expert outputs). Where a backward will run, the PyTorch path also
keeps the first projection (K*P, H1) for it; the Triton path recomputes it.

Autocast: the op gets x and the expert parameters as they are (float32 parameters, activations
of any float dtype) and the compute dtype as an argument; the kernels round each tile to it as
they load it. Casting beforehand costs a launch per tensor (five per call) and a cast copy of x:
6 bytes of traffic per float32 element, 75 MB for the first DDER of a 512x512 image, where the
whole forward's lower bound is about 100 MB.

Layout: ``reference.py`` (``*_ref``), ``triton_impl.py`` (kernels, launch configs, launchers),
``torch_impl.py`` (PyTorch path), ``native_impl.py`` (the C loops); this module validates the
arguments, asks ``_backend.resolve_impl`` which implementation runs and registers the custom ops.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._backend import grad_needed, resolve_impl
from . import native_impl, torch_impl, triton_impl
from .reference import (ACTIVATIONS, COMBINES, GATED_ACTIVATIONS, LAYOUTS, ROUTINGS, moe_mlp_ref,
                        topk_softmax_ref)

__all__ = ["topk_softmax", "topk_softmax_ref", "moe_mlp", "moe_mlp_ref", "noisy_topk_load", "importance",
           "router_z_loss", "cv_squared", "COMBINES", "ACTIVATIONS", "LAYOUTS", "ROUTINGS"]


# --------------------------------------------------------------------------------------------
# topk_softmax
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("m2restore_kernels::topk_softmax", mutates_args=())
def _topk_softmax_op(logits: Tensor, k: int, impl: str) -> tuple[Tensor, Tensor]:
    if impl == "triton":
        return triton_impl.topk_softmax_fwd(logits, k)
    return torch_impl.topk_softmax_fwd(logits, k, native=impl == "native")


@_topk_softmax_op.register_fake
def _(logits, k, impl):
    P = logits.shape[0]
    return logits.new_empty(P, k), logits.new_empty(P, k, dtype=torch.int64)


@torch.library.custom_op("m2restore_kernels::topk_softmax_bwd", mutates_args=())
def _topk_softmax_bwd_op(grad_weights: Tensor, weights: Tensor, indices: Tensor, n: int, impl: str) -> Tensor:
    path = triton_impl if impl == "triton" else torch_impl
    return path.topk_softmax_bwd(grad_weights, weights, indices, n)


@_topk_softmax_bwd_op.register_fake
def _(grad_weights, weights, indices, n, impl):
    return weights.new_empty(weights.shape[0], n)


def _topk_softmax_setup_context(ctx, inputs, output):
    logits, _, impl = inputs
    ctx.n, ctx.impl = logits.shape[1], impl
    ctx.save_for_backward(*output)


def _topk_softmax_backward(ctx, grad_weights, _grad_indices):
    weights, indices = ctx.saved_tensors
    return _topk_softmax_bwd_op(grad_weights, weights, indices, ctx.n, ctx.impl), None, None


_topk_softmax_op.register_autograd(_topk_softmax_backward, setup_context=_topk_softmax_setup_context)


def _check_topk_args(logits, k):
    if not isinstance(logits, Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"topk_softmax: logits must be a floating (P, N) tensor, got "
                         f"{getattr(logits, 'dtype', type(logits))} of shape {tuple(getattr(logits, 'shape', ()))}")
    N = logits.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= N:
        raise ValueError(f"topk_softmax: k must be an int in [1, N={N}], got {k!r}")


def topk_softmax(logits: Tensor, k: int, backend: str = "auto", *, routing: str = "topk_softmax",
                 renormalize: bool = True, return_next: bool = False):
    """Top-K routing: the K largest logits of each row and their gate weights.

    logits: (P, N) float32, float16, bfloat16 or float64; k an int in [1, N]. Returns ``weights``
    (P, K) in logits' dtype, sorted descending, and ``indices`` (P, K) int64; with
    ``return_next=True`` also ``next_logit`` (P,), the (K+1)-th largest logit (-inf where K = N),
    which a noisy top-K load estimate needs (:func:`noisy_topk_load`) without a second top-K.
    Differentiable in ``logits``.

    ``routing``: how the weights come from the logits; every backend takes every form.

    * ``"topk_softmax"`` (M2Restore): softmax over the K kept logits (the dropped ones get zero
      gradient);
    * ``"softmax_topk"`` (Mixtral, Qwen-MoE, OLMoE): softmax over all N, then the K largest;
      ``renormalize=True`` divides them by their sum (Mixtral, ``norm_topk_prob=True``), which is
      the same function as ``"topk_softmax"`` and runs as it; ``renormalize=False`` keeps the
      probabilities over all N (every logit gets a gradient).

    Order: ``torch.sort``'s (and ``torch.topk``'s) total order, whatever the logits: NaN ranks
    above +inf, -0.0 equals 0.0, and equal logits (NaNs among them) go to the lower expert index.
    So every row's indices are K distinct experts in [0, N), identical on every backend and equal
    to :func:`topk_softmax_ref`'s.

    Weights: ``torch.softmax`` of the kept logits. A row that keeps a NaN or a +inf, or keeps only
    -inf, gets NaN in every weight (the NaN stays visible, as with ``torch.topk`` + softmax, and
    its gradient is NaN); a kept -inf below a finite maximum gets weight 0.

    Precision: selection and softmax in the logits' own precision for float32 and float64 (float64
    runs the PyTorch path: ``backend="triton"`` raises a ValueError for it, ``"auto"`` picks
    ``"torch"``); 16-bit logits select exactly and normalise in float32. The backward runs in
    float32, or float64 for float64.
    """
    _check_topk_args(logits, k)
    if routing not in ROUTINGS:
        raise ValueError(f"topk_softmax: routing must be one of {ROUTINGS}, got {routing!r}")
    if not renormalize and routing != "softmax_topk":
        raise ValueError("topk_softmax: renormalize=False applies to routing='softmax_topk' only (the softmax over "
                         "the K kept logits sums to 1 already)")
    N = logits.shape[1]
    select = k + 1 if return_next and k < N else k
    impl = resolve_impl("topk_softmax", logits.device, logits.dtype, backend,
                        native_ok=N <= native_impl.TOPK_MAX_N)
    weights, selected = _topk_softmax_op(logits, select, impl)
    if renormalize and not return_next:  # the fused kernel's softmax is the answer
        return weights, selected
    indices = selected[:, :k]
    acc = torch_impl.accumulation_dtype(logits.dtype)
    if renormalize:
        weights = torch.softmax(logits.gather(1, indices).to(acc), dim=1).to(logits.dtype)
    else:
        weights = torch.softmax(logits.to(acc), dim=1).gather(1, indices).to(logits.dtype)
    if not return_next:
        return weights, indices
    if select > k:
        next_logit = logits.gather(1, selected[:, k:]).squeeze(1)
    else:  # K = N: no expert is left out
        next_logit = logits.new_full(logits.shape[:1], float("-inf"))
    return weights, indices, next_logit


def noisy_topk_load(clean_logits: Tensor, noisy_logits: Tensor, noise_std: Tensor, indices: Tensor,
                    next_logit: Tensor, keep_prob: float = 1.0) -> Tensor:
    """Shazeer et al.'s (2017) smooth load estimate for noisy top-K gates: (N,) float32 (float64 for
    float64), differentiable in the clean logits, the noise scale and the noisy thresholds.

    clean_logits, noisy_logits, noise_std (P, N); indices (P, K) and next_logit (P,) from
    ``topk_softmax(noisy_logits, k, return_next=True)``. Expert e's load sums over rows the
    probability that it stays in the top K under fresh noise, its other experts' noisy logits held
    fixed: it must beat the threshold thr, the (K+1)-th noisy logit where e is in the top K and the
    K-th where it is not. ``keep_prob``: the noise is kept with that probability per row and expert
    (a Bernoulli mask, as M2Restore's DDER draws it; 1: always), so

        load[e] = sum_p keep_prob * Phi((clean - thr) / std) + (1 - keep_prob) * [clean > thr].
    """
    if not 0.0 <= keep_prob <= 1.0:
        raise ValueError(f"noisy_topk_load: keep_prob must be a probability in [0, 1], got {keep_prob!r}")
    acc = torch_impl.accumulation_dtype(clean_logits.dtype)
    noisy, clean = noisy_logits.to(acc), clean_logits.to(acc)
    kth = noisy.gather(1, indices[:, -1:])
    nxt = next_logit.to(acc)[:, None]
    threshold = torch.where(noisy > nxt, nxt, kth)
    prob = torch.special.ndtr((clean - threshold) / noise_std.to(acc))
    if keep_prob != 1.0:
        prob = keep_prob * prob + (1 - keep_prob) * (clean > threshold).to(acc)
    return prob.sum(0)


def cv_squared(v: Tensor, eps: float = 1e-10) -> Tensor:
    """The squared coefficient of variation var(v) / (mean(v)^2 + eps) of a (N,) tensor (unbiased
    variance; 0 for a single expert), the usual balance loss on importance and load: a 0-d float32
    tensor (float64 for float64; integer counts are promoted)."""
    v = v.to(torch.promote_types(v.dtype, torch.float32))
    if v.numel() < 2:
        return v.new_zeros(())
    return v.var() / (v.mean() ** 2 + eps)


def importance(weights: Tensor, indices: Tensor, n_experts: int) -> Tensor:
    """Per-expert sum of the gate weights (N,) (float32, float64 for float64): the dense gates'
    column sums without building them. Differentiable in ``weights``."""
    acc = torch_impl.accumulation_dtype(weights.dtype)
    return weights.new_zeros(n_experts, dtype=acc).index_add(0, indices.reshape(-1), weights.reshape(-1).to(acc))


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE's router z-loss: the mean over rows of logsumexp(logits)^2 (a 0-d float32 tensor,
    float64 for float64)."""
    return torch.logsumexp(logits.to(torch_impl.accumulation_dtype(logits.dtype)), dim=1).square().mean()


# --------------------------------------------------------------------------------------------
# moe_mlp
# --------------------------------------------------------------------------------------------
def _check_index_range(indices: Tensor, n_experts: int):
    # Data-dependent (a host sync on CUDA), so it lives in the op body, not in the traced wrapper,
    # and is skipped while a CUDA graph is being captured.
    if indices.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    if indices.numel() and bool(((indices < 0) | (indices >= n_experts)).any()):
        raise ValueError(f"moe_mlp: indices must lie in [0, N={n_experts}), got values in "
                         f"[{int(indices.min())}, {int(indices.max())}]")


@torch.library.custom_op("m2restore_kernels::moe_mlp", mutates_args=())
def _moe_mlp_op(x: Tensor, weights: Tensor, indices: Tensor, w1: Tensor, b1: Optional[Tensor],
                w2: Tensor, b2: Optional[Tensor], combine: str, activation: str, impl: str, check_indices: bool,
                dtype: torch.dtype, save_hidden: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """GEMMs in ``dtype`` whatever the inputs' dtypes (autocast). -> (y (P, C) dtype, and for the
    backward: expert outputs (K*P, C) dtype, row k*P + p; the dispatch plan, order (K*P,) int64 and
    offsets (N+1,) int64, see ``torch_impl.sort_assignments``; the first projection's output
    (K*P, H1 padded) dtype in the plan's order where ``save_hidden`` (PyTorch path only), else
    (0, H1 padded))."""
    if check_indices:
        _check_index_range(indices, w1.shape[0])
    if impl == "triton":  # its backward recomputes the first projection
        return (*triton_impl.moe_mlp_fwd(x, weights, indices, w1, b1, w2, b2, combine, dtype, activation),
                _no_hidden(x, w2, activation, dtype))
    return torch_impl.moe_mlp_fwd(x, weights, indices, w1, b1, w2, b2, combine, dtype, activation,
                                  native=impl == "native", save_hidden=save_hidden)


def _no_hidden(x: Tensor, w2: Tensor, activation: str, dtype: torch.dtype) -> Tensor:
    """The (0, H1 padded) stand-in for a first projection the forward did not keep."""
    return x.new_empty(0, torch_impl.padded_hidden(w2.shape[1], activation), dtype=dtype)


@_moe_mlp_op.register_fake
def _(x, weights, indices, w1, b1, w2, b2, combine, activation, impl, check_indices, dtype, save_hidden):
    KP = indices.numel()
    hpre = _no_hidden(x, w2, activation, dtype)
    if save_hidden and impl != "triton":
        hpre = hpre.new_empty(KP, hpre.shape[1])
    return (x.new_empty(x.shape, dtype=dtype), x.new_empty(KP, x.shape[1], dtype=dtype),
            indices.new_empty(KP, dtype=torch.int64), indices.new_empty(w1.shape[0] + 1, dtype=torch.int64), hpre)


@torch.library.custom_op("m2restore_kernels::moe_mlp_bwd", mutates_args=())
def _moe_mlp_bwd_op(dy: Tensor, x: Tensor, weights: Tensor, order: Tensor, offsets: Tensor, w1: Tensor,
                    b1: Optional[Tensor], w2: Tensor, out: Tensor, hpre: Tensor, combine: str, activation: str,
                    impl: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> grads of (x, weights, w1, b1, w2, b2), each in its input's dtype (w1's for b1 and w2's for
    b2, which are computed even when the bias is None), w1's and w2's in their strides (empty_like);
    GEMMs in ``out``'s dtype. ``hpre``: the forward's kept first projection, or (0, H1 padded) to
    recompute it."""
    if impl == "triton":
        return triton_impl.moe_mlp_bwd(dy, x, weights, order, offsets, w1, b1, w2, out, combine, activation)
    return torch_impl.moe_mlp_bwd(dy, x, weights, order, offsets, w1, b1, w2, out, combine, activation,
                                  native=impl == "native", hpre=hpre if hpre.numel() else None)


@_moe_mlp_bwd_op.register_fake
def _(dy, x, weights, order, offsets, w1, b1, w2, out, hpre, combine, activation, impl):
    return (torch.empty_like(x), torch.empty_like(weights), torch.empty_like(w1),
            w1.new_empty(w1.shape[0], w1.shape[2]), torch.empty_like(w2), w2.new_empty(w2.shape[0], w2.shape[2]))


def _moe_mlp_setup_context(ctx, inputs, output):
    x, weights, indices, w1, b1, w2, b2, combine, activation, impl, _check, _dtype, _save = inputs
    ctx.combine, ctx.activation, ctx.impl = combine, activation, impl
    ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
    _, out, order, offsets, hpre = output
    ctx.save_for_backward(x, weights, order, offsets, w1, b1, w2, out, hpre)
    # Only y takes a gradient: the other outputs are the backward's own inputs, and materialising
    # their zero gradients wrote K*P*(C + H1) fresh values per backward (50 ms for one DDER at 224²).
    ctx.mark_non_differentiable(out, order, offsets, hpre)
    ctx.set_materialize_grads(False)


def _moe_mlp_backward(ctx, dy, *_grads_of_saved_outputs):
    x, weights, order, offsets, w1, b1, w2, out, hpre = ctx.saved_tensors
    dx, dweights, dw1, db1, dw2, db2 = _moe_mlp_bwd_op(
        dy, x, weights, order, offsets, w1, b1, w2, out, hpre, ctx.combine, ctx.activation, ctx.impl)
    return (dx, dweights, None, dw1, db1 if ctx.has_b1 else None, dw2, db2 if ctx.has_b2 else None,
            None, None, None, None, None, None)


_moe_mlp_op.register_autograd(_moe_mlp_backward, setup_context=_moe_mlp_setup_context)


def _check_args(x, weights, indices, w1, b1, w2, b2, combine, activation, layout, autocast: bool):
    named = dict(x=x, weights=weights, indices=indices, w1=w1, b1=b1, w2=w2, b2=b2)
    for name, t in named.items():
        if t is None and name in ("b1", "b2"):
            continue
        if not isinstance(t, Tensor):
            raise ValueError(f"moe_mlp: {name} must be a tensor, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"moe_mlp: {name} is on {t.device} but x is on {x.device}")
    if combine not in COMBINES:
        raise ValueError(f"moe_mlp: combine must be one of {COMBINES}, got {combine!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"moe_mlp: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"moe_mlp: layout must be one of {LAYOUTS} ((N, C, H1) and (N, Hd, C), or nn.Linear's "
                         f"(N, H1, C) and (N, C, Hd)), got {layout!r}")
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"moe_mlp: x must be a floating (P, C) tensor, got {x.dtype} of shape {tuple(x.shape)}")
    P, C = x.shape
    if indices.dim() != 2 or indices.shape[0] != P or indices.shape[1] < 1:
        raise ValueError(f"moe_mlp: indices must have shape (P={P}, K>=1), got {tuple(indices.shape)}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"moe_mlp: indices must be int64 or int32, got {indices.dtype}")
    if weights.shape != indices.shape or not weights.is_floating_point():
        raise ValueError(f"moe_mlp: weights must be a floating tensor of shape {tuple(indices.shape)} like indices, "
                         f"got {weights.dtype} of shape {tuple(weights.shape)}")
    gated = activation in GATED_ACTIVATIONS
    linear = layout == "linear"
    hidden = "2*Hd" if gated else "Hd"
    w1_form = f"(N, {hidden}, C)" if linear else f"(N, C, {hidden})"
    if w1.dim() != 3 or w1.shape[2 if linear else 1] != C or (gated and w1.shape[1 if linear else 2] % 2):
        raise ValueError(f"moe_mlp: w1 must have shape {w1_form} with C={C} for layout={layout!r}, "
                         f"activation={activation!r}, got {tuple(w1.shape)}")
    N, H1 = w1.shape[0], w1.shape[1 if linear else 2]
    Hd = H1 // 2 if gated else H1
    expected = dict(w2=(N, C, Hd) if linear else (N, Hd, C), b1=(N, H1), b2=(N, C))
    for name, shape in expected.items():
        t = named[name]
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"moe_mlp: {name} must have shape {shape} like w1 {tuple(w1.shape)} (N={N} experts, "
                             f"{hidden}={H1}, layout={layout!r}, activation={activation!r}), got {tuple(t.shape)}")
    for name in ("w1", "b1", "w2", "b2"):
        t = named[name]
        if t is not None and not t.is_floating_point():
            raise ValueError(f"moe_mlp: {name} must be floating, got {t.dtype}")
        if t is not None and t.dtype != x.dtype and not autocast:
            raise ValueError(f"moe_mlp: {name} has dtype {t.dtype} but x has {x.dtype} (mixed dtypes only "
                             f"under autocast)")


def _unit_stride(t: Tensor) -> Tensor:
    """A (N, rows, cols) weight as it lies when one of its two inner dims is dense (row-major or a
    transposed view: BLAS and the kernels take either), else a contiguous copy."""
    return t if 1 in t.stride()[1:] else t.contiguous()


def moe_mlp(x: Tensor, weights: Tensor, indices: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
            b2: Optional[Tensor], combine: str = "sum", backend: str = "auto", *, activation: str = "gelu",
            layout: str = "stacked", check_indices: bool = True) -> Tensor:
    """Sparse mixture of expert MLPs; only the K experts chosen per row are computed.

    x (P, C) float32, float16, bfloat16 or float64; weights (P, K) floating gate weights;
    indices (P, K) int64/int32 in [0, N). Expert parameters, all in x's dtype, with H1 = Hd for a
    plain ``activation`` (``"gelu"`` exact, ``"silu"``, ``"relu"``) and H1 = 2*Hd for a gated one
    (``"swiglu"``: SiLU(gate) * up, ``"geglu"``: GELU(gate) * up; w1's first Hd hidden units are
    the gate, the next Hd the up projection, as transformers' ``gate_up_proj``):

    * ``layout="stacked"``: w1 (N, C, H1), w2 (N, Hd, C) (x @ w1[e]);
    * ``layout="linear"``: nn.Linear's (out, in) per expert, w1 (N, H1, C), w2 (N, C, Hd)
      (x @ w1[e].T): read where they lie, no copy per call, and their gradients come back in
      that layout;

    b1 (N, H1) or None, b2 (N, C) or None. Returns y (P, C) in x's dtype:
    ``y[p] = sum_k weights[p,k] * (act(x[p] @ w1[e] + b1[e]) @ w2[e] + b2[e])``, e = indices[p,k],
    or with ``combine="logsumexp"`` ``y[p] = log sum_k weights[p,k] * exp(expert output)``.
    Differentiable in every floating input. Under autocast (CUDA, or CPU where bf16 GEMMs are
    fast) the GEMMs take the autocast dtype and y comes in it, as if x and the expert parameters
    had been cast first; x and the parameters may then differ in dtype. The casts happen as the
    kernels load their tiles (no cast copies), and each gradient comes in its input's dtype. The
    kernels accumulate in float32 and the K-way combination runs in float32; float64 computes
    everything in float64 on the PyTorch path (``backend="triton"`` raises a ValueError for it,
    ``"auto"`` picks ``"torch"``).

    NaN and infinities are not masked: they reach exactly the outputs computed from them (a NaN in
    x[p] or weights[p] gives a NaN y[p]; a NaN in expert e's parameters, every row routed to e).

    ``check_indices=False`` skips the ValueError check that every index lies in [0, N): on CUDA
    that check reads a flag back to the host, a sync on every call. Pass it for indices that
    :func:`topk_softmax` made; an out-of-range index then leaves its row undefined (it is never
    used to read or write out of bounds).
    """
    autocast = (isinstance(x, Tensor) and x.device.type in ("cuda", "cpu")
                and torch.is_autocast_enabled(x.device.type))
    _check_args(x, weights, indices, w1, b1, w2, b2, combine, activation, layout, autocast)
    dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
    if layout == "linear":  # views: the kernels take (N, C, H1) and (N, Hd, C) in any strides
        w1, w2 = w1.transpose(1, 2), w2.transpose(1, 2)
    x, weights, b1, b2 = (t.contiguous() if t is not None else None for t in (x, weights, b1, b2))
    impl = resolve_impl("moe_mlp", x.device, dtype, backend)
    # Keep the first projection for the backward only when there will be one (never in inference);
    # the Triton path recomputes it.
    save_hidden = impl != "triton" and grad_needed(x, weights, w1, b1, w2, b2)
    return _moe_mlp_op(x, weights, indices.long().contiguous(), _unit_stride(w1), b1, _unit_stride(w2), b2,
                       combine, activation, impl, check_indices, dtype, save_hidden)[0]
