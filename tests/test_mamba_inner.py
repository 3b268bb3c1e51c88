"""mamba_inner_fn / mamba_inner_ref against Mamba's block written out here in float64, and
torch.compile(fullgraph=True) of every selective-scan path through it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from m2restore_kernels import mamba_inner_fn, mamba_inner_ref, selective_scan, selective_scan_ref

F64 = torch.float64


def block_formula(xz, conv_w, conv_b, x_proj, dt_proj, out_proj, out_b, A, B=None, C=None, D=None, delta_bias=None,
                  B_proj_bias=None, C_proj_bias=None, delta_softplus=True, b_rms=None, c_rms=None, dt_rms=None,
                  eps=1e-6):
    """Mamba's block after in_proj, one time step at a time in float64 (complex A: complex B and C
    from interleaved real/imaginary columns, y = 2 Re(C . state))."""
    xz, conv_w, x_proj, dt_proj, out_proj = (t.double() for t in (xz, conv_w, x_proj, dt_proj, out_proj))
    d = xz.shape[1] // 2
    x, z = xz[:, :d], xz[:, d:]
    L, w, R = xz.shape[-1], conv_w.shape[-1], dt_proj.shape[1]
    xp = F.pad(x, (w - 1, 0))
    conv = sum(conv_w[:, 0, k, None] * xp[..., k:k + L] for k in range(w)) + conv_b.double()[:, None]
    x = conv * torch.sigmoid(conv)
    x_dbl = torch.einsum("bdl,ed->ble", x, x_proj)

    def rms(v, weight):
        return v if weight is None else v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps) * weight.double()

    delta = rms(torch.einsum("blr,dr->bld", x_dbl[..., :R], dt_proj), dt_rms).transpose(1, 2)
    cplx = A.is_complex()
    n = A.shape[1] * (2 if cplx else 1)

    def projected(cols, bias, weight):
        cols = rms(cols + (bias.double() if bias is not None else 0), weight)   # (b, l, n)
        return torch.view_as_complex(cols.unflatten(-1, (-1, 2)).contiguous()) if cplx else cols

    Bm = projected(x_dbl[..., R:R + n], B_proj_bias, b_rms) if B is None else None   # (b, l, n)
    Cm = projected(x_dbl[..., x_dbl.shape[-1] - n:], C_proj_bias, c_rms) if C is None else None
    dl = delta + (delta_bias.double()[:, None] if delta_bias is not None else 0)
    dl = torch.log1p(torch.exp(dl)) if delta_softplus else dl
    Ad = A.to(torch.complex128 if cplx else F64)
    state = torch.zeros(xz.shape[0], d, A.shape[1], dtype=Ad.dtype)
    ys = []
    for t in range(L):
        Bt = Bm[:, t, None, :] if B is None else B.double()[None]  # given: time-invariant (d, n)
        Ct = Cm[:, t, None, :] if C is None else C.double()[None]
        state = torch.exp(dl[:, :, t, None] * Ad) * state + dl[:, :, t, None] * Bt * x[:, :, t, None]
        y = (state * Ct).sum(-1)
        ys.append(2 * y.real if cplx else y)
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.double()[:, None] * x
    y = y * z * torch.sigmoid(z)
    out = torch.einsum("bdl,md->blm", y, out_proj)
    return out + out_b.double() if out_b is not None else out


def make(b=2, d=4, l=9, n=3, R=2, w=4, m=5, dtype=F64, complex_A=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return (scale * torch.randn(*s, generator=g, dtype=dtype))

    nc = 2 * n if complex_A else n
    A = -torch.rand(d, n, generator=g, dtype=dtype) - 0.5
    if complex_A:
        A = torch.complex(A, r(d, n))
    return dict(xz=r(b, 2 * d, l), conv1d_weight=r(d, 1, w, scale=0.5), conv1d_bias=r(d),
                x_proj_weight=r(R + 2 * nc, d, scale=0.5), delta_proj_weight=r(d, R, scale=0.5),
                out_proj_weight=r(m, d), out_proj_bias=r(m), A=A, D=r(d), delta_bias=r(d))


FORMS = ["plain", "proj_biases", "rms", "no_softplus", "complex_A", "given_BC", "no_D_no_out_bias"]


def form_args(form, dtype=F64):
    a = make(dtype=dtype, complex_A=form == "complex_A")
    g = torch.Generator().manual_seed(1)
    n = a["A"].shape[1]
    if form == "proj_biases":
        a.update(B_proj_bias=torch.randn(n, generator=g, dtype=dtype), C_proj_bias=torch.randn(n, generator=g, dtype=dtype))
    elif form == "rms":
        a.update(b_rms_weight=torch.rand(n, generator=g, dtype=dtype) + 0.5,
                 c_rms_weight=torch.rand(n, generator=g, dtype=dtype) + 0.5,
                 dt_rms_weight=torch.rand(4, generator=g, dtype=dtype) + 0.5)
    elif form == "no_softplus":
        a.update(delta_softplus=False, delta_bias=a["delta_bias"].abs() + 1)  # delta' = delta + bias, kept positive-ish
    elif form == "given_BC":
        a.update(B=torch.randn(4, n, generator=g, dtype=dtype), C=torch.randn(4, n, generator=g, dtype=dtype))
    elif form == "no_D_no_out_bias":
        a.update(D=None, out_proj_bias=None)
    return a


def formula(a):
    names = dict(conv1d_weight="conv_w", conv1d_bias="conv_b", x_proj_weight="x_proj", delta_proj_weight="dt_proj",
                 out_proj_weight="out_proj", out_proj_bias="out_b", b_rms_weight="b_rms", c_rms_weight="c_rms",
                 dt_rms_weight="dt_rms")
    return block_formula(**{names.get(k, k): v for k, v in a.items()})


@pytest.mark.parametrize("fn", [mamba_inner_fn, mamba_inner_ref])
@pytest.mark.parametrize("form", FORMS)
def test_matches_the_block_in_float64(fn, form):
    a = form_args(form)
    out = fn(**a)
    assert out.shape == (2, 9, 5) and out.dtype == F64
    torch.testing.assert_close(out, formula(a), rtol=1e-10, atol=1e-10)


def test_mamba_1_1_positional_call():
    """mamba_ssm 1.1.x's Mamba.forward: 7 positional weights, A, None, None, D, then keywords."""
    a = make()
    out = mamba_inner_fn(a["xz"], a["conv1d_weight"], a["conv1d_bias"], a["x_proj_weight"], a["delta_proj_weight"],
                         a["out_proj_weight"], a["out_proj_bias"], a["A"], None, None, a["D"],
                         delta_bias=a["delta_bias"], delta_softplus=True)
    torch.testing.assert_close(out, formula(a), rtol=1e-10, atol=1e-10)


def test_gradcheck():
    a = make(b=1, d=2, l=4, n=2, R=1, w=3, m=2)
    a.update(b_rms_weight=torch.rand(2, dtype=F64) + 0.5, dt_rms_weight=torch.rand(2, dtype=F64) + 0.5)
    names = list(a)
    for k in names:
        a[k].requires_grad_()

    def f(*tensors):
        return mamba_inner_fn(**dict(zip(names, tensors)))

    assert torch.autograd.gradcheck(f, tuple(a[k] for k in names), fast_mode=True)


def test_float32_on_the_c_loop_matches_float64_with_gradients():
    """backend="torch" on CPU float32: the scan's C loop (a custom op) inside the composition."""
    a64 = {k: v.requires_grad_() for k, v in form_args("proj_biases").items()}
    a32 = {k: v.detach().float().requires_grad_() for k, v in a64.items()}
    out32, out64 = mamba_inner_fn(**a32, backend="torch"), formula(a64)
    g = torch.randn_like(out64)
    out32.backward(g.float())
    out64.backward(g)
    rel = (out32.double() - out64).norm() / out64.norm()
    assert rel < 1e-5
    for k in a64:
        assert (a32[k].grad.double() - a64[k].grad).norm() <= 1e-4 * a64[k].grad.norm(), k


@pytest.mark.parametrize("change, match", [
    (dict(checkpoint_lvl=2), "checkpoint_lvl must be 0 or 1"),
    (dict(xz=torch.zeros(2, 7, 9, dtype=F64)), r"xz must be \(batch, 2 \* dim, seqlen\)"),
    (dict(x_proj_weight=torch.zeros(7, 4, dtype=F64)), r"x_proj_weight must be \(dt_rank \+ B and C columns >= 8"),
    (dict(delta_proj_weight=torch.zeros(3, 2, dtype=F64)), r"delta_proj_weight must be \(dim=4, dt_rank\)"),
    (dict(conv1d_weight=torch.zeros(4, 2, 3, dtype=F64)), r"conv1d_weight must be \(dim=4, 1, width\)"),
    (dict(b_rms_weight=torch.ones(3, dtype=F64), B=torch.zeros(4, 3, dtype=F64)), "b_rms_weight normalises"),
    (dict(dt_rms_weight=torch.ones(3, dtype=F64)), r"dt_rms_weight must be \(4,\)"),
])
def test_bad_input_is_a_one_line_value_error(change, match):
    a = make()
    a.update(change)
    with pytest.raises(ValueError, match=match):
        mamba_inner_fn(**a)


@pytest.mark.parametrize("path", ["torch_float64", "c_loop_float32"])
def test_fullgraph_compile_forward_and_backward(path):
    """The selective scan's PyTorch path (float64) and the C loop's custom op (float32) with the
    causal conv and the projections around them, under torch.compile(fullgraph=True); the float32
    case also through aot_autograd (slow to trace the PyTorch scan's backward; the Triton path:
    test_selective_scan)."""
    dtype = torch.float32 if path == "c_loop_float32" else F64
    a = {k: v.requires_grad_() for k, v in make(l=6, dtype=dtype).items()}
    compiled = torch.compile(mamba_inner_fn, fullgraph=True, backend="aot_eager" if dtype != F64 else "eager")
    out = compiled(**a, backend="torch")
    grads = torch.autograd.grad(out.sum(), list(a.values()))
    exp = formula(a)
    exp_grads = torch.autograd.grad(exp.sum(), list(a.values()))
    tol = 1e-10 if dtype == F64 else 1e-5
    assert (out.double() - exp).norm() <= tol * exp.norm()
    for got, want in zip(grads, exp_grads):
        assert (got.to(want.dtype) - want).norm() <= 10 * tol * want.norm()


def test_fullgraph_compile_of_the_scan_with_complex_A():
    """Complex A runs on the PyTorch scan, whose chunk length used to be read from the data (a
    graph break); the eager backend keeps this check cheap (dynamo's capture is what broke)."""
    a = make(l=6, complex_A=True)
    g = torch.Generator().manual_seed(2)
    b, d, l, n = 2, 4, 6, 3
    u, delta = torch.randn(b, d, l, generator=g, dtype=F64), torch.rand(b, d, l, generator=g, dtype=F64)
    B, C = (torch.randn(b, n, 2 * l, generator=g, dtype=F64) for _ in range(2))
    args = [t.requires_grad_() for t in (u, delta, a["A"], B, C, a["D"], a["delta_bias"])]

    def scan(u, delta, A, B, C, D, bias):
        return selective_scan(u, delta, A, B, C, D, None, bias, True, return_last_state=True, backend="torch")

    out, last = torch.compile(scan, fullgraph=True, backend="eager")(*args)
    ref, ref_last = selective_scan_ref(*args[:6], None, args[6], True, return_last_state=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last, ref_last, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad((out.sum(), last.abs().sum()), args)
    ref_grads = torch.autograd.grad((ref.sum(), ref_last.abs().sum()), args)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
