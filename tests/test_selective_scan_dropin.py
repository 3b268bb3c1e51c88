"""selective_scan as a drop-in for mamba_ssm's ``selective_scan_fn``: every argument form it accepts.

The forms: time-varying B and C ((b, n, l), or (b, g, n, l) groups) or time-invariant (d, n); real
or complex A (complex: time-varying B and C real, (b, n, 2l) / (b, g, n, 2l), real and imaginary
parts interleaved along time; the output is 2 Re(C x)). mamba_ssm's own test varies exactly these
flags (is_variable_B/C, varBC_groups, has_D, has_z, has_delta_bias, delta_softplus,
return_last_state, wtype float32/complex64); the grid below runs all of them on CPU tensors.

Chain of trust: ``seq64`` (a float64 formula written here, one channel's B/C picked at a time) ->
``selective_scan_ref`` (checked against it) -> every backend (checked against the reference in
float64, forward and every gradient).
"""
from __future__ import annotations

import importlib
import itertools

import pytest
import torch

from m2restore_kernels import selective_scan, selective_scan_ref
from m2restore_kernels._backend import DISABLE_ENV

ss_native = importlib.import_module("m2restore_kernels.selective_scan.native_impl")
ss_torch = importlib.import_module("m2restore_kernels.selective_scan.torch_impl")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}  # relative, against float64

# (is_variable_B, is_variable_C, varBC_groups): groups only with both time-varying, as in mamba_ssm
FORMS = [(False, False, 1), (False, True, 1), (True, False, 1), (True, True, 1), (True, True, 2)]
FLAGS = list(itertools.product([False, True], repeat=5))  # has_D, has_z, has_delta_bias, softplus, last_state


def form_id(form):
    vb, vc, g = form
    return f"B{'var' if vb else 'fix'}-C{'var' if vc else 'fix'}-g{g}"


def flag_id(flags):
    return "".join(name if on else "-" for name, on in zip(("D", "z", "b", "s", "L"), flags))


def make_args(form, flags, wtype=torch.float32, itype=torch.float32, b=2, d=4, n=8, l=128, seed=0):
    """The eight arguments of selective_scan (None where off) as leaves, drawn like mamba_ssm's test:
    A = -0.5 rand, delta = 0.5 rand, delta_bias = 0.5 rand, the rest standard normal."""
    vb, vc, g = form
    has_D, has_z, has_bias = flags[:3]
    gen = torch.Generator().manual_seed(seed)
    cplx = wtype.is_complex

    def rand(*shape, dtype=torch.float32):
        return torch.rand(*shape, generator=gen, dtype=dtype)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    def bc(variable):
        if not variable:
            return randn(d, n, dtype=wtype)
        lv = 2 * l if cplx else l
        return randn(*((b, n, lv) if g == 1 else (b, g, n, lv))).to(itype)

    tensors = [randn(b, d, l).to(itype), (0.5 * rand(b, d, l)).to(itype), -0.5 * rand(d, n, dtype=wtype),
               bc(vb), bc(vc), randn(d) if has_D else None, randn(b, d, l).to(itype) if has_z else None,
               0.5 * rand(d) if has_bias else None]
    return [None if t is None else t.to(DEVICE).requires_grad_() for t in tensors]


def wide(t):
    """float64 (complex128) leaf copy of t."""
    if t is None:
        return None
    return t.detach().to(torch.complex128 if t.is_complex() else torch.float64).requires_grad_()


def rel_err(a, b):
    a, b = (x.detach().to(torch.complex128) for x in (a, b))
    return ((a - b).abs().norm() / b.abs().norm().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------------------------
# Independent float64 formula, and the reference against it
# --------------------------------------------------------------------------------------------
def seq64(u, delta, A, B, C, D, z, delta_bias, softplus):
    """mamba_ssm's S6 scan in float64/complex128, written from its definition: each channel c takes
    its own B and C rows (group c // (d / g), or row c of a time-invariant (d, n)); complex A reads
    time-varying B and C as (re, im) pairs along time and outputs 2 Re(sum_n C x). -> (out, last)."""
    b, d, l = u.shape
    u, delta = u.double(), delta.double()
    cplx = A.is_complex()
    A = A.to(torch.complex128)
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if softplus:
        delta = torch.log1p(torch.exp(delta))

    def channel_rows(X, c):
        """(b, n, l) complex128 rows of B or C that channel c reads."""
        if X.dim() == 2:
            return X[c].to(torch.complex128)[None, :, None].expand(b, -1, l)
        rows = X if X.dim() == 3 else X[:, c // (d // X.shape[1])]
        rows = rows.double()
        return torch.complex(rows[..., 0::2], rows[..., 1::2]) if cplx else rows.to(torch.complex128)

    out = torch.zeros(b, d, l, dtype=torch.float64)
    last = torch.zeros(b, d, A.shape[1], dtype=torch.complex128)
    for c in range(d):
        Bc, Cc = channel_rows(B, c), channel_rows(C, c)
        x = torch.zeros(b, A.shape[1], dtype=torch.complex128)
        for t in range(l):
            dt = delta[:, c, t, None]
            x = torch.exp(dt * A[c]) * x + dt * u[:, c, t, None] * Bc[:, :, t]
            y = (x * Cc[:, :, t]).sum(-1)
            out[:, c, t] = 2 * y.real if cplx else y.real
        last[:, c] = x
    if D is not None:
        out = out + u * D.double()[:, None]
    if z is not None:
        zz = z.double()
        out = out * zz / (1 + torch.exp(-zz))
    return out, last if cplx else last.real


@pytest.mark.parametrize("wtype", [torch.float32, torch.complex64])
@pytest.mark.parametrize("form", FORMS, ids=form_id)
@pytest.mark.parametrize("flags", [(True, True, True, True, True), (False, False, False, False, True)], ids=flag_id)
def test_reference_matches_sequential_formula(form, flags, wtype):
    args = [wide(t) for t in make_args(form, flags, wtype, l=19, d=4, n=3)]
    out, last = selective_scan_ref(*args, delta_softplus=flags[3], return_last_state=True)
    want, want_last = seq64(*[None if t is None else t.detach() for t in args], flags[3])
    assert last.is_complex() == wtype.is_complex
    assert rel_err(out, want) <= 1e-12 and rel_err(last, want_last) <= 1e-12


def test_reference_complex_packing_order():
    """Complex A, time-varying B: entries 2t and 2t+1 are step t's real and imaginary parts (a B
    that is i at step 0 only: the state picks up i delta u, and 2 Re(C x) sees it through Im C)."""
    u = torch.ones(1, 1, 2, dtype=torch.float64)
    delta = torch.ones(1, 1, 2, dtype=torch.float64)
    A = torch.zeros(1, 1, dtype=torch.complex128)
    B = torch.tensor([[[0.0, 1.0, 0.0, 0.0]]], dtype=torch.float64)  # step 0: 0 + 1i, step 1: 0
    C = torch.tensor([[1j]], dtype=torch.complex128)                  # time-invariant C = i
    out, last = selective_scan_ref(u, delta, A, B, C, return_last_state=True)
    # x_0 = x_1 = i; y = 2 Re(i * i) = -2
    assert torch.equal(out, torch.full((1, 1, 2), -2.0, dtype=torch.float64))
    assert torch.equal(last, torch.tensor([[[1j]]], dtype=torch.complex128))


# --------------------------------------------------------------------------------------------
# backend="torch": mamba_ssm's flag matrix, the C loop and the chunked PyTorch scan
# --------------------------------------------------------------------------------------------
def check_against_reference(args, flags, backend, tol=None):
    """Forward (and last state) and the gradient of every input against selective_scan_ref in float64."""
    softplus, last_state = flags[3], flags[4]
    tol = tol or TOL[args[0].dtype]
    ref_args = [wide(t) for t in args]
    res = selective_scan(*args, delta_softplus=softplus, return_last_state=last_state, backend=backend)
    ref = selective_scan_ref(*ref_args, delta_softplus=softplus, return_last_state=last_state)
    outs, refs = (res, ref) if last_state else ((res,), (ref,))
    assert outs[0].dtype == args[0].dtype and outs[0].shape == refs[0].shape
    if last_state:
        assert outs[1].shape == refs[1].shape and outs[1].is_complex() == args[2].is_complex()
    for name, o, r in zip(("out", "last state"), outs, refs):
        assert rel_err(o, r) <= tol, f"{name}: {rel_err(o, r):.2e}"

    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(r.shape, generator=gen, dtype=r.dtype).to(DEVICE) for r in refs]
    loss = sum((o.to(w.dtype) * w.conj()).real.sum() for o, w in zip(outs, weights))
    ref_loss = sum((r * w.conj()).real.sum() for r, w in zip(refs, weights))
    given = [(name, t, r) for name, t, r in zip(NAMES, args, ref_args) if t is not None]
    grads = torch.autograd.grad(loss, [t for _, t, _ in given])
    ref_grads = torch.autograd.grad(ref_loss, [r for _, _, r in given])
    for (name, t, _), g, rg in zip(given, grads, ref_grads):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert rel_err(g, rg) <= tol, f"grad {name}: {rel_err(g, rg):.2e}"


@pytest.mark.parametrize("flags", FLAGS, ids=flag_id)
@pytest.mark.parametrize("form", FORMS, ids=form_id)
def test_flag_matrix_real_A(form, flags, scan_torch_impl):
    check_against_reference(make_args(form, flags), flags, "torch")


@pytest.mark.parametrize("flags", FLAGS, ids=flag_id)
@pytest.mark.parametrize("form", FORMS, ids=form_id)
def test_flag_matrix_complex_A(form, flags, monkeypatch):
    """Complex A runs on the chunked PyTorch scan under backend="torch" (the C loop is real-only)."""
    calls = []
    fwd = ss_torch.selective_scan_fwd
    monkeypatch.setattr(ss_torch, "selective_scan_fwd", lambda *a, **k: calls.append(1) or fwd(*a, **k))
    check_against_reference(make_args(form, flags, torch.complex64), flags, "torch")
    assert calls


@pytest.mark.parametrize("wtype", [torch.float32, torch.complex64])
@pytest.mark.parametrize("form", FORMS, ids=form_id)
def test_long_sequence(form, wtype, quick):
    """l = 2048 (mamba_ssm's test sweeps 128..4096): many chunks of the PyTorch scan / C checkpoints.
    The parameter gradients (A, B/C (d, n), D, delta_bias) sum 2048 float32 terms of both signs:
    relative 1e-5 of their float64 values is at that sum's rounding (1.05e-5 measured), hence 3e-5."""
    if quick:
        pytest.skip("--quick: the float64 step-by-step reference over 2048 steps runs in the full suite")
    flags = (True, True, True, True, True)
    check_against_reference(make_args(form, flags, wtype, l=2048, b=1), flags, "torch", tol=3e-5)


@pytest.mark.parametrize("itype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("wtype", [torch.float32, torch.complex64])
@pytest.mark.parametrize("form", FORMS, ids=form_id)
def test_half_precision_against_float64(form, wtype, itype):
    """Half-precision u, delta, z and time-varying B, C, compared with the float64 reference (not a
    float32 one: mamba_ssm's float32 reference gates by silu(z) in half precision)."""
    flags = (True, True, True, True, True)
    check_against_reference(make_args(form, flags, wtype, itype), flags, "torch")


@pytest.mark.parametrize("form", FORMS, ids=form_id)
def test_auto_complex_and_float64_take_the_pytorch_scan(form):
    """backend="auto" (Triton in the interpreter here) hands float64 and complex A to the PyTorch scan."""
    flags = (True, True, True, True, True)
    check_against_reference(make_args(form, flags, torch.complex64), flags, "auto")
    args64 = [wide(t) for t in make_args(form, flags, l=40)]
    out, last = selective_scan(*args64, delta_softplus=True, return_last_state=True, backend="auto")
    ref, ref_last = selective_scan_ref(*args64, delta_softplus=True, return_last_state=True)
    assert out.dtype == last.dtype == torch.float64
    assert rel_err(out, ref) <= 1e-12 and rel_err(last, ref_last) <= 1e-12


# --------------------------------------------------------------------------------------------
# Triton (interpreter on CPU): the real-A forms, small shapes
# --------------------------------------------------------------------------------------------
ALL_ON, ALL_OFF = (True,) * 5, (False,) * 5


# Each time-invariant form, and each flag set with both B and C fixed; the flags (constexprs HAS_D,
# HAS_Z, HAS_BIAS, SOFTPLUS, the last state) are branches of the kernels apart from VAR_B / VAR_C,
# which pick how B and C load, so the other forms need not run with both sets.
@pytest.mark.parametrize("form,flags", [(FORMS[0], ALL_ON), (FORMS[0], ALL_OFF), (FORMS[1], ALL_ON),
                                        (FORMS[2], ALL_OFF)],
                         ids=lambda v: form_id(v) if len(v) == 3 else flag_id(v))
def test_triton_time_invariant_forms(form, flags):
    """l = 70 crosses a checkpoint (chunks of 64)."""
    check_against_reference(make_args(form, flags, b=2, d=4, n=4, l=70), flags, "triton")


# --------------------------------------------------------------------------------------------
# NaN rule of the docstring
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["native", "chunked", "triton"])
def test_nan_propagates_forward_in_time_only(impl, monkeypatch):
    """A NaN in u at (channel 1, step 30): that channel is NaN from step 30 on, all else finite; one in
    B at step 50 (shared by every channel): every channel NaN from step 50 on."""
    if impl == "chunked":
        monkeypatch.setenv(DISABLE_ENV, "native")
    backend = "triton" if impl == "triton" else "torch"
    u, delta, A, B, C, D, z, bias = [t.detach() for t in make_args(FORMS[3], (True,) * 5, b=1, d=4, n=4, l=100)]
    u_nan, B_nan = u.clone(), B.clone()
    u_nan[0, 1, 30] = float("nan")
    B_nan[0, 2, 50] = float("nan")
    out = selective_scan(u_nan, delta, A, B, C, D, z, bias, True, backend=backend)
    assert out[0, 1, :30].isfinite().all() and out[0, 1, 30:].isnan().all()
    assert out[0, [0, 2, 3]].isfinite().all()
    out = selective_scan(u, delta, A, B_nan, C, D, z, bias, True, backend=backend)
    assert out[..., :50].isfinite().all() and out[..., 50:].isnan().all()


# --------------------------------------------------------------------------------------------
# Errors: one line naming what to do
# --------------------------------------------------------------------------------------------
def test_triton_refuses_complex_A_and_float64_naming_torch():
    flags = (True, True, True, True, True)
    args = [t.detach() for t in make_args(FORMS[3], flags, torch.complex64, l=8)]
    with pytest.raises(ValueError, match=r"backend='triton' does not take complex A; backend='torch' does"):
        selective_scan(*args, delta_softplus=True, backend="triton")
    args = [None if t is None else wide(t).detach() for t in make_args(FORMS[3], flags, l=8)]
    with pytest.raises(ValueError, match=r"float64 delta.*backend='torch' does"):
        selective_scan(*args, delta_softplus=True, backend="triton")


@pytest.mark.parametrize("bad,match", [
    ("complex_varying_B", "complex only as time-invariant"),   # time-varying B must be real-packed
    ("unpacked_B", r"2l|seqlen x 2"),                          # complex A wants (b, n, 2l)
    ("complex_B_real_A", "complex only as time-invariant"),
    ("complex_u", "must be real"),
    ("fixed_B_shape", "B must be"),
])
def test_bad_complex_and_time_invariant_forms_raise(bad, match):
    b, d, l, n = 1, 4, 6, 3
    u, delta = torch.randn(b, d, l), torch.rand(b, d, l)
    A, B, C = -torch.rand(d, n, dtype=torch.complex64), torch.randn(b, n, 2 * l), torch.randn(d, n)
    if bad == "complex_varying_B":
        B = torch.randn(b, n, 2 * l, dtype=torch.complex64)
    elif bad == "unpacked_B":
        B = torch.randn(b, n, l)
    elif bad == "complex_B_real_A":
        A, B = A.real.contiguous(), torch.randn(d, n, dtype=torch.complex64)
    elif bad == "complex_u":
        u = u.to(torch.complex64)
    elif bad == "fixed_B_shape":
        B = torch.randn(d, n + 1)
    with pytest.raises(ValueError, match=match):
        selective_scan(u, delta, A, B, C, backend="torch")
