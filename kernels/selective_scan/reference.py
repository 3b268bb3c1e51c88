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


def _per_channel(X: Tensor, d: int) -> Tensor:
    """B or C, (b, n, l) or (b, g, n, l) -> (b, d or 1, n, l), channel c reading group c // (d / g)."""
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
    """Sequential reference, one time step at a time (float32, or float64 for float64 inputs).

    u, delta, z: (b, d, l); A: (d, n); B, C: (b, n, l) or (b, g, n, l); D, delta_bias: (d,).
    Returns out (b, d, l) in u's dtype, and with ``return_last_state`` also x_{l-1} (b, d, n) in the
    compute dtype.
    """
    _check_args(u, delta, A, B, C, D, z, delta_bias)
    dlt = _effective_delta(delta, delta_bias, delta_softplus)
    ct = dlt.dtype
    d = u.shape[1]
    A, uc = A.to(ct), u.to(ct)
    Bd, Cd = _per_channel(B.to(ct), d), _per_channel(C.to(ct), d)
    x = uc.new_zeros(u.shape[0], d, A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        x = torch.exp(dlt[:, :, t, None] * A) * x + (dlt[:, :, t] * uc[:, :, t])[..., None] * Bd[..., t]
        ys.append((x * Cd[..., t]).sum(-1))
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
    if A.is_complex():
        raise ValueError("A must be real (complex A is not supported)")
    n = A.shape[1]
    for name, X in (("B", B), ("C", C)):
        if X.dim() == 3:
            ok = X.shape == (b, n, l)
        elif X.dim() == 4:
            ok = X.shape[0] == b and X.shape[2:] == (n, l) and X.shape[1] >= 1 and d % X.shape[1] == 0
        else:
            ok = False
        if not ok:
            raise ValueError(f"{name} must be (batch={b}, dstate={n}, seqlen={l}) or (batch, groups, dstate, seqlen) "
                             f"with groups dividing dim={d}; got shape {tuple(X.shape)}")
    for name, X in (("D", D), ("delta_bias", delta_bias)):
        if X is not None and X.shape != (d,):
            raise ValueError(f"{name} must be (dim={d},), got shape {tuple(X.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None]
    if any(t.device != u.device for t in tensors):
        raise ValueError("all inputs must be on one device")
    if any(not t.is_floating_point() for t in tensors):
        raise ValueError("all inputs must be floating point")



def group_sizes(X: Tensor, d: int):
    """(groups, channels per group) of B or C."""
    g = X.shape[1] if X.dim() == 4 else 1
    return g, d // g
