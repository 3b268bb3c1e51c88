"""Selective scan (Mamba's S6 recurrence) with the signature and semantics of mamba_ssm's ``selective_scan_fn``.

Per batch b, channel d and state n (delta' = softplus(delta + delta_bias) or delta + delta_bias):

    x_t = exp(delta'_t A[d, n]) x_{t-1} + delta'_t B[n, t] u_t,    x_{-1} = 0
    y_t = sum_n C[n, t] x_t[n];    out = (y + D u) * silu(z)

B and C are time-varying and shared by all channels, (b, n, l), or by the channels of one of g
groups, (b, g, n, l) (channel d reads group d // (d_inner / g)); or time-invariant, one row per
channel, (d, n) (mamba_ssm's ``is_variable_B/C=False``). A is (d, n), real or complex. With complex
A the state is complex, y_t = 2 Re(sum_n C[n, t] x_t[n]), and time-varying B and C come as real
(b, n, 2l) or (b, g, n, 2l), real and imaginary parts interleaved along time (mamba_ssm's packing);
time-invariant ones are (d, n), real or complex.

Implementations, chosen by ``_backend.resolve_impl`` (one module each):

* ``reference.py``: ``selective_scan_ref``, the recurrence one step at a time, the float reference
  of the tests, and the argument checks.
* ``torch_impl.py`` (``"torch"``: non-CPU tensors without Triton, float64, complex A, or no C
  compiler): a chunked scan in PyTorch ops, autograd through them; every form above.
* ``native_impl.py`` (``"native"``: ``backend="torch"`` or ``"auto"`` without Triton, on CPU,
  float32/16/bf16): the recurrence as one fused C loop, ``csrc/selective_scan_cpu.c``.
* ``triton_impl.py`` (``"triton"``): chunk-parallel scans in Triton, forward and backward; real A,
  float32/16/bf16 (float64 or complex A under ``backend="auto"`` go to the PyTorch scan).
* ``"extension"``: ``backend="auto"`` on CUDA uses mamba_ssm's own kernel when that package
  imports (it is imported lazily, never on CPU).

The C loop and the Triton kernels run as the custom op ``m2restore_kernels::selective_scan`` (with
its backward ``selective_scan_bwd``), which receives the resolved implementation as ``impl``.

mamba_ssm's other entry points live here too: ``selective_state_update`` (one decode step, state in
place: PyTorch ops in ``reference.py``, or the Triton kernel of ``triton_impl.py`` as the custom op
``m2restore_kernels::selective_state_update``) and ``mamba_inner_fn`` (Mamba's block after in_proj:
the causal conv, the projections and this scan composed, so autograd gives its backward), each
with its ``*_ref``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._backend import OPS, grad_needed, optional_op, resolve_impl
from . import native_impl, torch_impl, triton_impl
from ..causal_conv1d import causal_conv1d_fn
from .reference import (_check_args, check_state_update_args, heads_form, mamba_inner, mamba_inner_ref, selective_scan_ref,
                        selective_state_update_ref)

__all__ = ["selective_scan", "selective_scan_ref", "selective_state_update", "selective_state_update_ref",
           "mamba_inner_fn", "mamba_inner_ref"]

MAMBA_SELECTIVE_SCAN_FN = OPS["selective_scan"].extension
_FUSED = {"triton": triton_impl, "native": native_impl}  # the implementations behind the custom op


# --------------------------------------------------------------------------------------------
# Custom ops (torch.compile / torch.export see them as single nodes)
# --------------------------------------------------------------------------------------------
def _checkpoint_chunk(impl: str, u: Tensor, B: Tensor, C: Tensor, n: int) -> int:
    return native_impl.NATIVE_CHUNK if impl == "native" else triton_impl.config_for(u, B, C, n).chunk


@torch.library.custom_op("m2restore_kernels::selective_scan", mutates_args=())
def _selective_scan_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                       z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
                       impl: str) -> tuple[Tensor, Tensor, Tensor]:
    """Forward of the fused kernels (``impl`` "triton" or "native") -> (out (b, d, l), last state
    (b, d, n) f32, checkpoints (b, chunks, d, n) f32)."""
    return _FUSED[impl].selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


@_selective_scan_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, impl):
    b, d, l = u.shape
    n = A.shape[1]
    n_chunks = -(-l // _checkpoint_chunk(impl, u, B, C, n))
    return (torch.empty_like(u), u.new_empty(b, d, n, dtype=torch.float32),
            u.new_empty(b, n_chunks, d, n, dtype=torch.float32))


@torch.library.custom_op("m2restore_kernels::selective_scan_bwd", mutates_args=())
def _selective_scan_bwd_op(dout: Tensor, dlast: Optional[Tensor], u: Tensor, delta: Tensor, A: Tensor, B: Tensor,
                           C: Tensor, D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                           ckpt: Tensor, delta_softplus: bool, impl: str
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> du, ddelta, dA, dB, dC, dD, dz, ddelta_bias (empty where the input is None)."""
    return _FUSED[impl].selective_scan_bwd(dout.contiguous(), None if dlast is None else dlast.contiguous(), u, delta,
                                           A, B, C, D, z, delta_bias, ckpt, delta_softplus)


@_selective_scan_bwd_op.register_fake
def _(dout, dlast, u, delta, A, B, C, D, z, delta_bias, ckpt, delta_softplus, impl):
    def like(x):
        return torch.empty_like(x) if x is not None else u.new_empty(0)

    return (torch.empty_like(u), torch.empty_like(delta), torch.empty_like(A), torch.empty_like(B),
            torch.empty_like(C), like(D), like(z), like(delta_bias))


def _selective_scan_setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, impl = inputs
    ctx.delta_softplus, ctx.impl = delta_softplus, impl
    ctx.present = (D is not None, z is not None, delta_bias is not None)
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2])


def _selective_scan_backward(ctx, dout, dlast, _dckpt):
    u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, dz, dbias = _selective_scan_bwd_op(dout, dlast, u, delta, A, B, C, D, z, delta_bias,
                                                                   ckpt, ctx.delta_softplus, ctx.impl)
    has_D, has_z, has_bias = ctx.present
    return (du, ddelta, dA, dB, dC, dD if has_D else None, dz if has_z else None, dbias if has_bias else None,
            None, None)


_selective_scan_op.register_autograd(_selective_scan_backward, setup_context=_selective_scan_setup_context)


def _resolve(device: torch.device, dtype: torch.dtype, complex_A: bool, backend: str) -> str:
    """``resolve_impl``'s choice, narrowed to an implementation that takes these inputs: the fused
    kernels compute in float32 with real A, mamba_ssm's kernel takes no float64."""
    impl = resolve_impl("selective_scan", device, dtype, backend, native_ok=not complex_A)
    wide = dtype == torch.float64
    if impl == "triton" and (wide or complex_A):
        if backend == "triton":
            what = f"{dtype} delta (it computes in float32)" if wide else "complex A"
            raise ValueError(f"selective_scan: backend='triton' does not take {what}; backend='torch' does")
        impl = resolve_impl("selective_scan", device, dtype, "torch", native_ok=not complex_A)
    if impl == "extension" and wide:
        impl = "torch"
    return impl


# --------------------------------------------------------------------------------------------
# Public entry
# --------------------------------------------------------------------------------------------
def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, backend: str = "auto"):
    """Mamba's selective scan; mamba_ssm ``selective_scan_fn`` semantics (see the module docstring).

    Shapes: u, delta, z: (b, d, l); A: (d, n), real or complex; B, C: (b, n, l), (b, g, n, l) with g
    dividing d, or time-invariant (d, n) (complex A: time-varying ones real, (b, n, 2l) or
    (b, g, n, 2l)); D, delta_bias: (d,). Every backend takes every real-A form; complex A runs on
    the PyTorch scan (``backend="torch"``, or ``"auto"`` unless mamba_ssm's kernel takes it) and
    mamba_ssm's kernel; ``backend="triton"`` raises a ValueError for it.

    Dtypes: any real float for u, delta, z, B, C, D, delta_bias, each input its own. The recurrence
    runs in float32, or in float64 when delta is float64 (PyTorch scan only: ``backend="triton"``
    raises a ValueError for float64, ``"auto"`` takes the PyTorch scan). Returns out (b, d, l) in
    u's dtype, plus with ``return_last_state`` the last state (b, d, n) in that compute dtype
    (complex for complex A). Gradients reach every floating input, each in its dtype (and flow from
    the last state).

    NaN and inf are not checked: they propagate forward in time. A NaN in u, delta or z at step t
    of a channel makes that channel's outputs NaN from step t on; one in B or C at step t those of
    every channel reading that row; earlier steps and other channels stay finite.

    ``backend``: "auto" (mamba_ssm's kernel on CUDA when installed, else Triton where it runs, else
    PyTorch), "triton" or "torch" (the C loop on CPU, else PyTorch). Raises a one-line ValueError
    for bad shapes, or a form the requested backend does not take, naming the backend that does.
    """
    _check_args(u, delta, A, B, C, D, z, delta_bias)
    impl = _resolve(u.device, delta.dtype, A.is_complex(), backend)
    if impl == "extension":
        # mamba_ssm wants A, D and delta_bias in float32 (casts are differentiable)
        return optional_op(*MAMBA_SELECTIVE_SCAN_FN)(
            u, delta, A.float(), B, C, None if D is None else D.float(), z,
            None if delta_bias is None else delta_bias.float(), delta_softplus, return_last_state)
    if impl == "torch":
        out, last = torch_impl.selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    else:
        args = [None if t is None else t.contiguous() for t in (u, delta, A, B, C, D, z, delta_bias)]
        out, last, _ = _selective_scan_op(*args, delta_softplus, impl)
    return (out, last) if return_last_state else out


def _fused_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                        z: Optional[Tensor], dt_bias: Optional[Tensor], dt_softplus: bool,
                        state_batch_indices: Optional[Tensor], impl: str) -> Tensor:
    """The fused decode step (``impl`` "triton" or "native") on the arguments as given (either
    form, checked by selective_state_update), state written in place -> out shaped like x, in x's dtype."""
    if impl == "native":  # takes either form as it is: no views to make per step
        out = native_impl.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus,
                                                 state_batch_indices)
    else:
        out = triton_impl.selective_state_update(*heads_form(state, x, dt, A, B, C, D, z, dt_bias), dt_softplus,
                                                 state_batch_indices)
        out = out if state.dim() == 4 else out.squeeze(1)
    return out if out.dtype == x.dtype else out.to(x.dtype)


# The same as a custom op, which torch.compile keeps whole. Eager calls skip it: on a CPU the
# custom-op dispatch costs more than a small model's whole decode step.
_state_update_op = torch.library.custom_op("m2restore_kernels::selective_state_update",
                                           mutates_args=("state",))(_fused_state_update)


@_state_update_op.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices, impl):
    return torch.empty_like(x)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None, backend: str = "auto"):
    """mamba_ssm's ``selective_state_update``: one decode step of the scan, ``state`` updated in place
    -> out (batch, [nheads,] dim) in x's dtype. Shapes, forms (single-head and multi-head with
    grouped B/C), dtypes and ``state_batch_indices`` as :func:`~.reference.selective_state_update_ref`.

    ``backend``: "auto" (Triton where it runs, else PyTorch) | "triton" | "torch". The Triton kernel
    (one program per block of channels, batch row and head; the custom op
    ``m2restore_kernels::selective_state_update``, which mutates ``state``) computes in float32 and
    has no backward, like mamba_ssm's: float64 (``"triton"`` raises a ValueError for it) and calls
    that need gradients (any input requiring grad under grad mode) take the PyTorch ops, which are
    differentiable in every input but the state.
    """
    check_state_update_args(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices)
    wide = torch.float64 in (state.dtype, x.dtype, dt.dtype, A.dtype, B.dtype, C.dtype)
    impl = resolve_impl("selective_state_update", x.device, torch.float64 if wide else x.dtype, backend)
    # The C loop stores the state as float32, so it takes only a float32 state.
    if ((impl == "triton" or (impl == "native" and state.dtype == torch.float32))
            and not grad_needed(x, dt, A, B, C, D, z, dt_bias)):
        step = _state_update_op if torch.compiler.is_compiling() else _fused_state_update
        return step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices, impl)
    return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices)


def mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                   out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None,
                   delta_softplus=True, checkpoint_lvl=1, b_rms_weight=None, c_rms_weight=None, dt_rms_weight=None,
                   b_c_dt_rms_eps=1e-6, backend: str = "auto"):
    """mamba_ssm's ``mamba_inner_fn`` (2.x signature; 1.1.x's is its first 15 parameters): Mamba's
    block between in_proj and the output, out (batch, seqlen, d_model) =
    out_proj(scan(silu(causal_conv(x)), delta, A, B, C, D, z, delta_bias)) with x, z = xz.chunk(2, 1),
    x_dbl = x_proj(conv output) split into delta's rank columns (then delta_proj), B's and C's
    (projected only where B, C are None; + B/C_proj_bias, RMS-normalised by b/c_rms_weight, delta by
    dt_rms_weight, eps b_c_dt_rms_eps).

    xz (b, 2d, l); conv1d_weight (d, 1, w) (or (d, w)); conv1d_bias (d,); x_proj_weight
    (rank + 2 n, d) (n doubled for complex A); delta_proj_weight (d, rank); out_proj_weight
    (d_model, d); A (d, n) real or complex; D, delta_bias (d,). Forward and backward are
    :func:`causal_conv1d_fn`, ``F.linear`` and :func:`selective_scan` composed, each on ``backend``
    (no fused kernel; ``checkpoint_lvl`` 0 or 1 is accepted and changes nothing: the conv output
    and delta are kept for the backward). Under autocast the projections run in the autocast dtype.
    """
    def scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend=backend)

    def conv(x, weight, bias, activation):
        return causal_conv1d_fn(x, weight, bias, activation=activation, backend=backend)

    return mamba_inner(conv, scan, xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                       out_proj_bias, A, B, C, D, delta_bias, B_proj_bias, C_proj_bias, delta_softplus,
                       checkpoint_lvl, b_rms_weight, c_rms_weight, dt_rms_weight, b_c_dt_rms_eps)
