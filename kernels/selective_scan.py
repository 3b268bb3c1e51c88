"""Selective scan (Mamba's S6 recurrence), with the signature of mamba_ssm's selective_scan_fn."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """u, delta (b, d, l); A (d, n); B, C (b, n, l) or (b, g, n, l); D (d,); z (b, d, l); delta_bias (d,).
    Sequential float reference: x_t = exp(delta_t A) x_{t-1} + delta_t B_t u_t; y_t = C_t . x_t."""
    dtype_in = u.dtype
    u, delta = u.float() if u.dtype != torch.float64 else u, delta.float() if delta.dtype != torch.float64 else delta
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].to(delta.dtype)
    if delta_softplus:
        delta = F.softplus(delta)
    b, d, l = u.shape
    A = A.to(delta.dtype)
    B = B.to(delta.dtype)
    C = C.to(delta.dtype)
    if B.dim() == 4:
        B = B.repeat_interleave(d // B.shape[1], dim=1)  # (b, d, n, l)
    else:
        B = B.unsqueeze(1)
    if C.dim() == 4:
        C = C.repeat_interleave(d // C.shape[1], dim=1)
    else:
        C = C.unsqueeze(1)
    x = u.new_zeros(b, d, A.shape[1])
    ys = []
    for t in range(l):
        x = torch.exp(delta[:, :, t, None] * A) * x + delta[:, :, t, None] * B[..., t] * u[:, :, t, None]
        ys.append((x * C[..., t]).sum(-1))
    y = torch.stack(ys, dim=2)
    if D is not None:
        y = y + u * D[:, None].to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    y = y.to(dtype_in)
    return (y, x) if return_last_state else y


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, backend: str = "auto"):
    return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
