"""Plain reference of the selective scan (one time step at a time), its argument checks and the
helpers every path shares: the effective step size, B/C group layout and the output gate."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._slots import check_indices, read_rows, write_rows_
from ..causal_conv1d.reference import causal_conv1d_ref


# A table, not dtype.to_complex(), which torch.compile cannot trace.
_COMPLEX = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _effective_delta(delta: Tensor, delta_bias: Optional[Tensor], delta_softplus: bool) -> Tensor:
    """delta (b, d, l) -> delta' in the compute dtype."""
    delta = delta.to(_compute_dtype(delta.dtype))
    if delta_bias is not None:
        delta = delta + delta_bias.to(delta.dtype)[:, None]
    return F.softplus(delta) if delta_softplus else delta


def _to_compute(X: Tensor, ct: torch.dtype) -> Tensor:
    """X in the compute dtype ct (float32/64), or its complex counterpart for complex X."""
    return X.to(_COMPLEX[ct] if X.is_complex() else ct)


def _complex_bc(X: Tensor, ct: torch.dtype) -> Tensor:
    """B or C for complex A in the compute dtype: (d, n) as given (real or complex), or the
    time-varying forms with real and imaginary parts interleaved along time, (..., n, 2l) ->
    complex (..., n, l)."""
    if X.dim() == 2:
        return X.to(_COMPLEX[ct])
    return torch.view_as_complex(X.to(ct).unflatten(-1, (-1, 2)).contiguous())


def _per_channel(X: Tensor, d: int) -> Tensor:
    """B or C, (b, n, l) or (b, g, n, l) -> (b, d or 1, n, l), channel c reading group c // (d / g);
    time-invariant (d, n) -> (1, d, n, 1)."""
    if X.dim() == 2:
        return X[None, :, :, None]
    if X.dim() == 3:
        return X.unsqueeze(1)
    return X.repeat_interleave(d // X.shape[1], dim=1)


def _gate(y: Tensor, u: Tensor, D: Optional[Tensor], z: Optional[Tensor]) -> Tensor:
    if D is not None:
        y = y + u.to(y.dtype) * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """Sequential reference, one time step at a time (float32, or float64 for float64 delta), with
    mamba_ssm ``selective_scan_ref``'s semantics. Shapes and forms as :func:`selective_scan`'s: A (d, n)
    real or complex; B, C time-varying (b, n, l) / (b, g, n, l) (with complex A: real (b, n, 2l) /
    (b, g, n, 2l), real and imaginary parts interleaved along time) or time-invariant (d, n). With
    complex A the state is complex and y_t = 2 Re(sum_n C[n, t] x_t[n]).
    Returns out (b, d, l) in u's dtype, and with ``return_last_state`` also x_{l-1} (b, d, n) in the
    compute dtype (complex for complex A).
    """
    _check_args(u, delta, A, B, C, D, z, delta_bias)
    dlt = _effective_delta(delta, delta_bias, delta_softplus)
    ct = dlt.dtype
    d = u.shape[1]
    uc = u.to(ct)
    cplx = A.is_complex()
    A = _to_compute(A, ct)
    Bd, Cd = (_per_channel(_complex_bc(X, ct) if cplx else X.to(ct), d) for X in (B, C))
    x = A.new_zeros(u.shape[0], d, A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        Bt, Ct = (X[..., min(t, X.shape[-1] - 1)] for X in (Bd, Cd))  # time-invariant: length 1
        x = torch.exp(dlt[:, :, t, None] * A) * x + (dlt[:, :, t] * uc[:, :, t])[..., None] * Bt
        y = (x * Ct).sum(-1)
        ys.append(2 * y.real if cplx else y)
    y = torch.stack(ys, dim=2) if ys else uc.new_zeros(u.shape)
    out = _gate(y, uc, D, z).to(u.dtype)
    return (out, x) if return_last_state else out


def _check_args(u, delta, A, B, C, D, z, delta_bias):
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, dim, seqlen), got shape {tuple(u.shape)}")
    b, d, l = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (dim={d}, dstate), got shape {tuple(A.shape)}")
    n = A.shape[1]
    cplx = A.is_complex()
    lv = 2 * l if cplx else l  # complex A: real and imaginary parts interleaved along time
    for name, X in (("B", B), ("C", C)):
        if X.dim() == 2:
            ok = X.shape == (d, n)
        elif X.dim() == 3:
            ok = X.shape == (b, n, lv)
        elif X.dim() == 4:
            ok = X.shape[0] == b and X.shape[2:] == (n, lv) and X.shape[1] >= 1 and d % X.shape[1] == 0
        else:
            ok = False
        if not ok:
            raise ValueError(f"{name} must be (dim={d}, dstate={n}), (batch={b}, dstate={n}, {lv}) or (batch, groups, "
                             f"dstate, {lv}) with groups dividing dim={d}"
                             f"{' (complex A: seqlen x 2, real/imag interleaved)' if cplx else ''}; "
                             f"got shape {tuple(X.shape)}")
        if X.is_complex() and (X.dim() != 2 or not cplx):
            raise ValueError(f"{name} may be complex only as time-invariant (dim, dstate) with complex A; "
                             f"got {X.dtype} of shape {tuple(X.shape)} with {A.dtype} A")
    for name, X in (("D", D), ("delta_bias", delta_bias)):
        if X is not None and X.shape != (d,):
            raise ValueError(f"{name} must be (dim={d},), got shape {tuple(X.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None]
    if any(t.device != u.device for t in tensors):
        raise ValueError("all inputs must be on one device")
    if any(not (t.is_floating_point() or t.is_complex()) for t in tensors):
        raise ValueError("all inputs must be floating point (A, and time-invariant B and C, may be complex)")
    if any(t.is_complex() for t in (u, delta, D, z, delta_bias) if t is not None):
        raise ValueError("u, delta, D, z and delta_bias must be real")


def group_sizes(X: Tensor, d: int):
    """(groups, channels per group) of time-varying B or C ((1, d) for the time-invariant form)."""
    g = X.shape[1] if X.dim() == 4 else 1
    return g, d // g


# --------------------------------------------------------------------------------------------
# One decode step: mamba_ssm's selective_state_update
# --------------------------------------------------------------------------------------------
# Each argument of a step: its single-head rank, and where the multi-head form has its nheads axis.
# mamba_ssm lifts each argument by its own rank, so the two forms may be mixed within one call.
HEAD_AXIS = dict(state=(3, 1), x=(2, 1), dt=(2, 1), A=(2, 0), B=(2, 1), C=(2, 1), D=(1, 0), z=(2, 1), dt_bias=(1, 0))
_OPTIONAL = ("D", "z", "dt_bias")


def heads_form(state, x, dt, A, B, C, D, z, dt_bias):
    """The single-head form (state (b, d, n), x (b, d), A (d, n), B/C (b, n), D/dt_bias (d,)) as the
    multi-head one with one head, each argument by its own rank (mamba_ssm's rule)."""
    return tuple(t.unsqueeze(HEAD_AXIS[name][1]) if t is not None and t.dim() == HEAD_AXIS[name][0] else t
                 for name, t in zip(HEAD_AXIS, (state, x, dt, A, B, C, D, z, dt_bias)))


def lifted(name: str, values: tuple, fill: int) -> tuple:
    """A shape or strides tuple of argument ``name`` in the multi-head form: ``fill`` put in on the
    nheads axis when the argument has the single-head rank (what :func:`heads_form` does, without
    making views: a decode step checks and calls on tuples)."""
    rank, axis = HEAD_AXIS[name]
    return (*values[:axis], fill, *values[axis:]) if len(values) == rank else tuple(values)


def check_state_update_args(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices):
    """A one-line ValueError naming the argument unless these are one step's arguments, each in
    the multi-head form or its single-head one."""
    if not isinstance(x, Tensor) or not x.is_floating_point():  # first: every device is compared with x's
        raise ValueError(f"x must be a real floating tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    device = x.device
    for name, t in zip(HEAD_AXIS, (state, x, dt, A, B, C, D, z, dt_bias)):
        if t is None and name in _OPTIONAL:
            continue
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a real floating tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but x is on {device}")
    if state.dim() not in (3, 4):
        raise ValueError(f"state must be (batch, dim, dstate) or (batch, nheads, dim, dstate), "
                         f"got {tuple(state.shape)}")
    slots, h, p, n = lifted("state", state.shape, 1)
    b = x.shape[0]
    if state_batch_indices is None and slots != b:
        raise ValueError(f"state must have x's batch {b} rows (or pass state_batch_indices), "
                         f"got {lifted('state', state.shape, 1)}")
    B_shape = lifted("B", B.shape, 1)
    g = B_shape[1] if len(B_shape) == 3 else 0
    expected = dict(x=(b, h, p), dt=(b, h, p), A=(h, p, n), B=(b, g, n), C=(b, g, n), D=(h, p), z=(b, h, p),
                    dt_bias=(h, p))
    for name, t in zip(expected, (x, dt, A, B, C, D, z, dt_bias)):
        if t is not None and lifted(name, t.shape, 1) != expected[name]:
            raise ValueError(f"{name} must be {expected[name]} (or its single-head form) for state "
                             f"(batch, nheads={h}, dim={p}, dstate={n}), got {lifted(name, t.shape, 1)}")
    if g < 1 or h % g:
        raise ValueError(f"B and C must be (batch, ngroups, dstate) with ngroups dividing nheads={h}, "
                         f"got {B_shape}")
    check_indices("state_batch_indices", state_batch_indices, b, device)


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                               state_batch_indices=None):
    """Reference (and PyTorch path) of :func:`selective_state_update`: one step of the recurrence,
    ``state`` updated in place.

    Multi-head form: state (batch, nheads, dim, dstate); x, dt, z (batch, nheads, dim); A (nheads,
    dim, dstate); B, C (batch, ngroups, dstate), head h reading group h // (nheads / ngroups); D,
    dt_bias (nheads, dim). Single-head form: the same without the nheads axis (B, C (batch, dstate)).
    With dt' = softplus(dt + dt_bias) (or dt + dt_bias):
    state' = exp(dt' A) state + dt' B x, out = (sum_n C state' + D x) * silu(z).
    state_batch_indices (batch,): the state rows to read and write (state then has any number of
    rows); a negative index marks a padding row: out zero, no row written.
    Computed in float32 (float64 when state, x, dt, A, B or C is float64); the state is stored in its
    dtype, out (from the unrounded new state) in x's dtype.
    """
    heads = state.dim() == 4
    check_state_update_args(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices)
    st, x4, dt4, A4, B4, C4, D4, z4, bias4 = heads_form(state, x, dt, A, B, C, D, z, dt_bias)
    ct = torch.float64 if any(t.dtype == torch.float64 for t in (state, x, dt, A, B, C)) else torch.float32
    old, valid = read_rows(st, state_batch_indices)
    h, g = A4.shape[0], B4.shape[1]
    delta = dt4.to(ct) + (bias4.to(ct) if bias4 is not None else 0)
    delta = F.softplus(delta) if dt_softplus else delta
    xc = x4.to(ct)
    Bh, Ch = (X.to(ct).repeat_interleave(h // g, dim=1)[:, :, None, :] for X in (B4, C4))
    prev = old.to(ct)
    if torch.is_grad_enabled():
        prev = prev.clone()  # the product saves it for the backward, and the state is overwritten below
    new = torch.exp(delta[..., None] * A4.to(ct)) * prev + (delta * xc)[..., None] * Bh
    out = (new * Ch).sum(-1)
    if D4 is not None:
        out = out + xc * D4.to(ct)
    if z4 is not None:
        out = out * F.silu(z4.to(ct))
    if valid is not None:
        out = out.masked_fill(~valid[:, None, None], 0.0)
    write_rows_(st, state_batch_indices, valid, old, new)  # st is a view of state: writes reach it
    out = out.to(x.dtype)
    return out if heads else out.squeeze(1)


# --------------------------------------------------------------------------------------------
# Mamba's inner block: mamba_ssm's mamba_inner_fn
# --------------------------------------------------------------------------------------------
def rms_norm(x: Tensor, weight: Tensor, eps: float, dim: int = -1) -> Tensor:
    """x / sqrt(mean(x^2 along dim) + eps) * weight, computed in float32 (float64 for float64),
    returned in x's dtype (mamba_ssm's ``rms_norm_forward``, which normalises rows)."""
    ct = _compute_dtype(x.dtype)
    xc = x.to(ct)
    return (xc * torch.rsqrt(xc.square().mean(dim, keepdim=True) + eps) * weight.to(ct)).to(x.dtype)


def _projected_bc(cols: Tensor, proj_bias, rms_weight, eps: float, complex_A: bool) -> Tensor:
    """B or C from its columns of x_proj's output, (b, l, n) or (b, l, 2n) for complex A ->
    (b, n, l), or (b, n, 2l) with real and imaginary parts interleaved along time."""
    if proj_bias is not None:
        cols = cols + proj_bias.to(cols.dtype)
    if rms_weight is not None:
        cols = rms_norm(cols, rms_weight, eps)
    if complex_A:
        b, l, n2 = cols.shape
        return cols.reshape(b, l, n2 // 2, 2).permute(0, 2, 1, 3).reshape(b, n2 // 2, 2 * l)
    return cols.transpose(1, 2)


def check_mamba_inner_args(xz, conv1d_weight, x_proj_weight, delta_proj_weight, out_proj_weight, A, B, C,
                           checkpoint_lvl, b_rms_weight, c_rms_weight, dt_rms_weight):
    if not isinstance(xz, Tensor) or xz.dim() != 3 or xz.shape[1] % 2:
        raise ValueError(f"xz must be (batch, 2 * dim, seqlen), got shape {tuple(getattr(xz, 'shape', ()))}")
    d = xz.shape[1] // 2
    if conv1d_weight.dim() not in (2, 3) or conv1d_weight.shape[0] != d or (
            conv1d_weight.dim() == 3 and conv1d_weight.shape[1] != 1):
        raise ValueError(f"conv1d_weight must be (dim={d}, 1, width) or (dim, width), got {tuple(conv1d_weight.shape)}")
    if delta_proj_weight.dim() != 2 or delta_proj_weight.shape[0] != d:
        raise ValueError(f"delta_proj_weight must be (dim={d}, dt_rank), got {tuple(delta_proj_weight.shape)}")
    if A.dim() != 2:
        raise ValueError(f"A must be (dim={d}, dstate), got shape {tuple(A.shape)}")
    n = A.shape[1] * (2 if A.is_complex() else 1)
    need = delta_proj_weight.shape[1] + (n if B is None else 0) + (n if C is None else 0)
    if x_proj_weight.dim() != 2 or x_proj_weight.shape[1] != d or x_proj_weight.shape[0] < need:
        raise ValueError(f"x_proj_weight must be (dt_rank + B and C columns >= {need}, dim={d}), "
                         f"got {tuple(x_proj_weight.shape)}")
    if out_proj_weight.dim() != 2 or out_proj_weight.shape[1] != d:
        raise ValueError(f"out_proj_weight must be (d_model, dim={d}), got {tuple(out_proj_weight.shape)}")
    if checkpoint_lvl not in (0, 1):
        raise ValueError(f"checkpoint_lvl must be 0 or 1, got {checkpoint_lvl!r}")
    for name, w, size, given in (("b_rms_weight", b_rms_weight, n, B), ("c_rms_weight", c_rms_weight, n, C),
                                 ("dt_rms_weight", dt_rms_weight, d, None)):
        if w is None:
            continue
        if given is not None or A.is_complex():
            raise ValueError(f"{name} normalises the projected {name[0].upper()} of real A only (as in mamba_ssm)")
        if w.shape != (size,):
            raise ValueError(f"{name} must be ({size},), got {tuple(w.shape)}")


def mamba_inner(conv, scan, xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None,
                delta_softplus=True, checkpoint_lvl=1, b_rms_weight=None, c_rms_weight=None, dt_rms_weight=None,
                b_c_dt_rms_eps=1e-6):
    """Mamba's inner block from a causal conv ``conv(x, weight, bias, activation=)`` and a selective
    scan ``scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)``: the composition that
    :func:`mamba_inner_ref` and :func:`~m2restore_kernels.selective_scan.mamba_inner_fn` share."""
    check_mamba_inner_args(xz, conv1d_weight, x_proj_weight, delta_proj_weight, out_proj_weight, A, B, C,
                           checkpoint_lvl, b_rms_weight, c_rms_weight, dt_rms_weight)
    rank = delta_proj_weight.shape[1]
    n = A.shape[1] * (2 if A.is_complex() else 1)
    x, z = xz.chunk(2, dim=1)
    x = conv(x, conv1d_weight.squeeze(1) if conv1d_weight.dim() == 3 else conv1d_weight, conv1d_bias,
             activation="silu")
    # (b, l, d) rows made contiguous, as mamba_ssm does: one copy, and a layout the linears' backward
    # can view under torch.compile (aot_autograd fails on the transposed view)
    x_dbl = F.linear(x.transpose(1, 2).contiguous(), x_proj_weight)     # (b, l, rank + 2n)
    delta = delta_proj_weight @ x_dbl[..., :rank].transpose(1, 2)      # (b, d, l), the scan's layout
    if dt_rms_weight is not None:
        delta = rms_norm(delta, dt_rms_weight[:, None], b_c_dt_rms_eps, dim=1)
    if B is None:
        B = _projected_bc(x_dbl[..., rank:rank + n], B_proj_bias, b_rms_weight, b_c_dt_rms_eps, A.is_complex())
    if C is None:
        C = _projected_bc(x_dbl[..., x_dbl.shape[-1] - n:], C_proj_bias, c_rms_weight, b_c_dt_rms_eps,
                          A.is_complex())
    y = scan(x, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return F.linear(y.transpose(1, 2).contiguous(), out_proj_weight, out_proj_bias)  # (b, l, d_model)


def mamba_inner_ref(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                    out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None,
                    delta_softplus=True, checkpoint_lvl=1, b_rms_weight=None, c_rms_weight=None, dt_rms_weight=None,
                    b_c_dt_rms_eps=1e-6):
    """Reference of :func:`~m2restore_kernels.selective_scan.mamba_inner_fn` (same signature): the
    causal conv's and the scan's references composed (mamba_ssm's ``mamba_inner_ref`` takes
    ``delta_softplus`` but always applies softplus; this one follows the flag)."""
    return mamba_inner(causal_conv1d_ref, selective_scan_ref, xz, conv1d_weight, conv1d_bias, x_proj_weight,
                       delta_proj_weight, out_proj_weight, out_proj_bias, A, B, C, D, delta_bias, B_proj_bias,
                       C_proj_bias, delta_softplus, checkpoint_lvl, b_rms_weight, c_rms_weight, dt_rms_weight,
                       b_c_dt_rms_eps)
