"""Plain reference of the selective scan (one time step at a time), its argument checks and the
helpers every path shares: the effective step size, B/C group layout and the output gate."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


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
    return X.to(ct.to_complex() if X.is_complex() else ct)


def _complex_bc(X: Tensor, ct: torch.dtype) -> Tensor:
    """B or C for complex A in the compute dtype: (d, n) as given (real or complex), or the
    time-varying forms with real and imaginary parts interleaved along time, (..., n, 2l) ->
    complex (..., n, l)."""
    if X.dim() == 2:
        return X.to(ct.to_complex())
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
