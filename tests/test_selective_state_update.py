"""selective_state_update: mamba_ssm's one decode step, against a float64 formula written here."""
from __future__ import annotations

import functools

import pytest
import torch

from m2restore_kernels import selective_scan, selective_state_update, selective_state_update_ref

F64 = torch.float64


def step_formula(state, x, dt, A, B, C, D, z, dt_bias, softplus):
    """Multi-head form in float64, head h reading group h // (nheads / ngroups):
    dt' = softplus?(dt + dt_bias); state' = exp(dt' A) state + dt' B x; out = (C . state' + D x) silu(z)."""
    h, g = A.shape[0], B.shape[1]
    group = torch.arange(h) // (h // g)
    Bh, Ch = B.double()[:, group], C.double()[:, group]             # (b, h, n)
    d = dt.double() + (dt_bias.double() if dt_bias is not None else 0.0)
    d = torch.log1p(torch.exp(d)) if softplus else d
    new = torch.exp(d[..., None] * A.double()) * state.double() + d[..., None] * Bh[:, :, None] * x.double()[..., None]
    out = torch.einsum("bhpn,bhn->bhp", new, Ch)
    if D is not None:
        out = out + D.double() * x.double()
    if z is not None:
        out = out * z.double() * torch.sigmoid(z.double())
    return out, new


def make(b=3, h=4, p=5, n=6, g=2, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=dtype)

    return dict(state=r(b, h, p, n), x=r(b, h, p), dt=r(b, h, p), A=-torch.rand(h, p, n, generator=gen, dtype=dtype),
                B=r(b, g, n), C=r(b, g, n), D=r(h, p), z=r(b, h, p), dt_bias=r(h, p))


@pytest.mark.parametrize("fn", [selective_state_update, selective_state_update_ref])
@pytest.mark.parametrize("heads", [True, False])
@pytest.mark.parametrize("flags", ["all", "none", "softplus_only", "D_z"])
def test_matches_formula_in_float64(fn, heads, flags):
    a = make() if heads else make(h=1, g=1)
    softplus = flags in ("all", "softplus_only")
    keep = {"all": ("D", "z", "dt_bias"), "none": (), "softplus_only": (), "D_z": ("D", "z")}[flags]
    for name in ("D", "z", "dt_bias"):
        if name not in keep:
            a[name] = None
    exp_out, exp_state = step_formula(**a, softplus=softplus)
    if not heads:  # mamba_ssm's single-head form: drop the nheads axis (B and C's ngroups axis)
        a = {k: None if v is None else v.squeeze(1 if k in ("state", "x", "dt", "z", "B", "C") else 0)
             for k, v in a.items()}
        exp_out, exp_state = exp_out.squeeze(1), exp_state.squeeze(1)
    state = a.pop("state").clone()
    out = fn(state, **a, dt_softplus=softplus)
    torch.testing.assert_close(out, exp_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, exp_state, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_state_batch_indices_with_padding_and_a_16bit_state(state_dtype, backend):
    """Rows picked by state_batch_indices; -1: out zero and no row written. The state is stored in
    its dtype; out comes from the unrounded new state (computed in float32)."""
    a = make(dtype=torch.float32)
    cache = torch.randn(7, 4, 5, 6).to(state_dtype)
    idx = torch.tensor([5, -1, 2], dtype=torch.int32)
    valid = idx >= 0
    exp_out, exp_rows = step_formula(cache[idx.clamp_min(0).long()], **{k: v for k, v in a.items() if k != "state"},
                                     softplus=True)
    got = cache.clone()
    out = selective_state_update(got, **{k: v for k, v in a.items() if k != "state"}, dt_softplus=True,
                                 state_batch_indices=idx, backend=backend)
    assert out.dtype == torch.float32 and torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out[valid].double(), exp_out[valid], rtol=1e-5, atol=1e-5)
    expected = cache.clone()
    expected[idx[valid].long()] = exp_rows[valid].to(state_dtype)
    tol = max(torch.finfo(state_dtype).eps, 4e-6)  # one bfloat16 rounding apart, or float32 arithmetic
    torch.testing.assert_close(got.double(), expected.double(), rtol=tol, atol=tol)
    untouched = [r for r in range(7) if r not in (5, 2)]
    assert torch.equal(got[untouched], cache[untouched])


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads", [True, False])
def test_fused_step_matches_formula_on_strided_inputs(dtype, heads, backend):
    """The Triton step (interpreter on CPU) and the C loop (backend="torch" on CPU; a float16 state
    takes the PyTorch ops) read any strides: x, dt, z as slices of wider tensors, A broadcast over
    dim (mamba_ssm's tied form), the state a slice of a larger cache."""
    a = make(dtype=dtype) if heads else make(h=1, g=1, dtype=dtype)
    for k in ("x", "dt", "z"):
        a[k] = torch.cat([a[k], torch.randn_like(a[k])], dim=-1)[..., :5]
    a["A"] = a["A"][:, :1].expand(-1, 5, -1)
    cache = torch.cat([a["state"], torch.randn_like(a["state"])], dim=-1)
    a["state"] = cache[..., :6]
    exp_out, exp_state = step_formula(**a, softplus=True)
    if not heads:
        a = {k: None if v is None else v.squeeze(1 if k in ("state", "x", "dt", "z", "B", "C") else 0)
             for k, v in a.items()}
        exp_out, exp_state = exp_out.squeeze(1), exp_state.squeeze(1)
    state = a.pop("state")
    out = selective_state_update(state, **a, dt_softplus=True, backend=backend)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), exp_out, rtol=tol, atol=tol)
    torch.testing.assert_close(state.double(), exp_state, rtol=tol, atol=tol)


@pytest.mark.parametrize("heads", [True, False])
@pytest.mark.parametrize("optional", [True, False])  # D, z and dt_bias given, or None
def test_c_loop_over_several_blocks_of_channels(heads, optional):
    """The C loop (backend="torch" on CPU, float32 state) works on blocks of 64 channels per batch row
    and head: 130 channels (two whole blocks and a partial one), slots with a padding row."""
    a = make(b=3, h=2, p=130, n=16, g=1, dtype=torch.float32) if heads else make(b=3, h=1, p=130, n=16, g=1,
                                                                                  dtype=torch.float32)
    if not optional:
        a.update(D=None, z=None, dt_bias=None)
    cache = torch.randn(4, *a.pop("state").shape[1:])
    idx = torch.tensor([3, -1, 0])
    exp_out, exp_rows = step_formula(cache[idx.clamp_min(0)], **a, softplus=True)
    exp_out[1] = 0
    expected = cache.double().clone()
    expected[[3, 0]] = exp_rows[[0, 2]]
    if not heads:
        a = {k: None if v is None else v.squeeze(1 if k in ("x", "dt", "z", "B", "C") else 0) for k, v in a.items()}
        cache, expected, exp_out = cache.squeeze(1), expected.squeeze(1), exp_out.squeeze(1)
    out = selective_state_update(cache, **a, dt_softplus=True, state_batch_indices=idx, backend="torch")
    torch.testing.assert_close(out.double(), exp_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["triton", "native"])
def test_custom_op_registration(impl):
    a = make(dtype=torch.float32)
    args = (a["state"], a["x"], a["dt"], a["A"], a["B"], a["C"], a["D"], a["z"], a["dt_bias"], True,
            torch.tensor([2, -1, 0], dtype=torch.int32), impl)
    torch.library.opcheck(torch.ops.m2restore_kernels.selective_state_update.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_steps_continue_the_selective_scan():
    """l decode steps from the scan's state after a prefix equal the scan's outputs on the rest."""
    gen = torch.Generator().manual_seed(3)
    b, d, n, l = 2, 3, 4, 9
    u, delta, z = (torch.randn(b, d, l, generator=gen, dtype=F64) for _ in range(3))
    A = -torch.rand(d, n, generator=gen, dtype=F64)
    B, C = torch.randn(b, n, l, generator=gen, dtype=F64), torch.randn(b, n, l, generator=gen, dtype=F64)
    D, bias = torch.randn(d, generator=gen, dtype=F64), torch.randn(d, generator=gen, dtype=F64)
    whole = selective_scan(u, delta, A, B, C, D, z, bias, True)
    _, state = selective_scan(u[..., :5], delta[..., :5], A, B[..., :5], C[..., :5], D, z[..., :5], bias, True,
                              return_last_state=True)
    steps = [selective_state_update(state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D, z[..., t], bias, True)
             for t in range(5, l)]
    torch.testing.assert_close(torch.stack(steps, dim=-1), whole[..., 5:], rtol=1e-11, atol=1e-11)


def test_gradcheck_in_every_input_but_the_state():
    a = {k: v.requires_grad_() for k, v in make(b=2, h=2, p=2, n=3, g=1).items()}
    state = a.pop("state").detach()

    def f(*args):
        return selective_state_update(state.clone(), *args, dt_softplus=True)

    assert torch.autograd.gradcheck(f, tuple(a.values()))


@pytest.mark.parametrize("change, match", [
    (dict(x=torch.zeros(3, 4, 4, dtype=F64)), r"x must be \(3, 4, 5\)"),
    (dict(A=torch.zeros(4, 5, 5, dtype=F64)), r"A must be \(4, 5, 6\)"),
    (dict(B=torch.zeros(3, 3, 6, dtype=F64), C=torch.zeros(3, 3, 6, dtype=F64)), "ngroups dividing nheads=4"),
    (dict(C=torch.zeros(3, 2, 5, dtype=F64)), r"C must be \(3, 2, 6\)"),
    (dict(dt_bias=torch.zeros(5, dtype=F64)), r"dt_bias must be \(4, 5\)"),
    (dict(state_batch_indices=torch.zeros(2, dtype=torch.int32)), r"state_batch_indices must be \(batch=3,\)"),
    (dict(x=torch.zeros(3, 4, 5, dtype=torch.int32)), "x must be a real floating tensor"),
    (dict(backend="cuda"), "backend"),
])
def test_bad_input_is_a_one_line_value_error(change, match):
    a = make()
    a.update(change)
    with pytest.raises(ValueError, match=match):
        selective_state_update(**a)


# PyTorch ops; the Triton custom op; the C loop's custom op
@pytest.mark.parametrize("dtype, backend", [(F64, "auto"), (torch.float32, "auto"), (torch.float32, "torch")])
def test_fullgraph_compile(dtype, backend):
    a = make(dtype=dtype)
    cache = torch.randn(5, 4, 5, 6, dtype=dtype)
    idx = torch.tensor([4, -1, 0], dtype=torch.int32)
    step = torch.compile(functools.partial(selective_state_update, backend=backend), fullgraph=True,
                         backend="aot_eager")
    expected_cache = cache.clone()
    rest = {k: v for k, v in a.items() if k != "state"}
    exp = selective_state_update_ref(expected_cache, **rest, dt_softplus=True, state_batch_indices=idx)
    tol = 0 if dtype == F64 else 1e-5
    torch.testing.assert_close(step(cache, **rest, dt_softplus=True, state_batch_indices=idx), exp, rtol=tol, atol=tol)
    torch.testing.assert_close(cache, expected_cache, rtol=tol, atol=tol)
