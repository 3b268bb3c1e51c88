"""causal_conv1d_fn / causal_conv1d_update: causal-conv1d's whole API, against float64 loops written here."""
from __future__ import annotations

import functools
import itertools

import math

import pytest
import torch

from m2restore_kernels import (causal_conv1d, causal_conv1d_fn, causal_conv1d_ref, causal_conv1d_update,
                               causal_conv1d_update_ref, causal_conv1d_varlen_states, causal_conv1d_varlen_states_ref)

F64 = torch.float64


def act(s: float, activation) -> float:
    return s / (1 + math.exp(-s)) if activation in ("silu", "swish") else s


def conv_loops(x, weight, bias=None, seq_idx=None, initial_states=None, activation=None):
    """out[b, c, t] = act(bias[c] + sum_k weight[c, k] * v(t - (w - 1) + k)), where v(s) is x[b, c, s]
    for s >= 0, initial_states[b, c, w - 1 + s] (or 0) for s < 0, and taps from another sequence
    than t's (seq_idx; the states belong to the row's first sequence) count as 0; 0 where seq_idx < 0."""
    B, D, L = x.shape
    w = weight.shape[1]
    out = torch.zeros(B, D, L, dtype=F64)
    for b in range(B):
        for t in range(L):
            if seq_idx is not None and seq_idx[b, t] < 0:
                continue
            for c in range(D):
                s = float(bias[c]) if bias is not None else 0.0
                for k in range(w):
                    p = t - (w - 1) + k
                    src = 0 if p < 0 else p
                    if seq_idx is not None and seq_idx[b, src] != seq_idx[b, t]:
                        continue
                    if p >= 0:
                        s += float(weight[c, k]) * float(x[b, c, p])
                    elif initial_states is not None:
                        s += float(weight[c, k]) * float(initial_states[b, c, w - 1 + p])
                out[b, c, t] = act(s, activation)
    return out


def final_loops(x, initial_states, w):
    """The last w - 1 inputs of [initial_states (or zeros), x]."""
    prefix = initial_states if initial_states is not None else torch.zeros(x.shape[0], x.shape[1], w - 1, dtype=x.dtype)
    full = torch.cat([prefix, x], dim=-1)
    return full[..., full.shape[-1] - (w - 1):]


def make(b=2, d=3, l=9, w=3, dtype=F64, seed=0, channel_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, d, generator=g, dtype=dtype).transpose(1, 2) if channel_last else \
        torch.randn(b, d, l, generator=g, dtype=dtype)
    return (x, torch.randn(d, w, generator=g, dtype=dtype), torch.randn(d, generator=g, dtype=dtype),
            torch.randn(b, d, w - 1, generator=g, dtype=dtype))


SEQ_IDX = torch.tensor([[0, 0, 1, 1, 1, 1, 2, 2, 2], [5, 5, 5, 5, 5, 7, 7, -1, -1]], dtype=torch.int32)


@pytest.mark.parametrize("fn", [causal_conv1d_fn, causal_conv1d_ref])
@pytest.mark.parametrize("activation", [None, "silu", "swish"])
@pytest.mark.parametrize("form", ["plain", "initial_states", "final_states", "seq_idx", "seq_idx+initial_states",
                                  "channel_last+states", "no_bias", "width1", "width4"])
def test_matches_loops_in_float64(fn, activation, form):
    w = {"width1": 1, "width4": 4}.get(form, 3)
    x, weight, bias, init = make(w=w, channel_last=form.startswith("channel_last"))
    bias = None if form == "no_bias" else bias
    init = init if "states" in form else None
    seq_idx = SEQ_IDX if form.startswith("seq_idx") else None
    finals = "final" in form or form.startswith("channel_last")
    got = fn(x, weight, bias, seq_idx=seq_idx, initial_states=init, return_final_states=finals, activation=activation)
    out, final = got if finals else (got, None)
    assert out.dtype == F64 and out.shape == x.shape
    torch.testing.assert_close(out, conv_loops(x, weight, bias, seq_idx, init, activation), rtol=1e-12, atol=1e-12)
    if finals:
        torch.testing.assert_close(final, final_loops(x, init, w), rtol=0, atol=0)


def test_final_states_out_is_written_in_place_and_returned():
    x, weight, bias, init = make()
    buf = torch.full((2, 5, 3), 7.0, dtype=F64).transpose(1, 2)[:, :, :2]  # (b, d, w - 1), channel-last
    out, final = causal_conv1d_fn(x, weight, bias, initial_states=init, return_final_states=True,
                                  final_states_out=buf)
    assert final is buf
    torch.testing.assert_close(buf, final_loops(x, init, 3), rtol=0, atol=0)


@pytest.mark.parametrize("itype", [torch.float16, torch.bfloat16, torch.float32])
def test_16bit_x_with_float32_weights_computes_in_float32(itype):
    """causal-conv1d's common case: float32 weight and bias, 16-bit x, out in x's dtype."""
    x, weight, bias, init = make(dtype=torch.float32)
    x, init = x.to(itype), init.to(itype)
    out, final = causal_conv1d_fn(x, weight, bias, initial_states=init, return_final_states=True, activation="silu")
    assert out.dtype == final.dtype == itype
    exp = conv_loops(x.double(), weight.double(), bias.double(), None, init.double(), "silu")
    # float32 accumulation, then one rounding to itype
    eps = torch.finfo(itype).eps
    torch.testing.assert_close(out.double(), exp, rtol=eps, atol=eps)
    assert torch.equal(final, final_loops(x, init, 3))


def test_seqlen_zero_gives_empty_output_and_initial_states_as_final():
    x, weight, bias, init = make(l=0)
    out, final = causal_conv1d_fn(x, weight, bias, initial_states=init, return_final_states=True)
    assert out.shape == (2, 3, 0)
    assert torch.equal(final, init)
    assert causal_conv1d(x.float(), weight.float()).shape == (2, 3, 0)


@pytest.mark.parametrize("form", ["states", "seq_idx"])
def test_gradcheck(form):
    x, weight, bias, init = (t.requires_grad_() for t in make(b=2, d=2, l=9))  # l = 9: SEQ_IDX's
    if form == "states":
        def f(x, weight, bias, init):
            out, final = causal_conv1d_fn(x, weight, bias, initial_states=init, return_final_states=True,
                                          activation="silu")
            return out, final
    else:
        def f(x, weight, bias, init):
            return causal_conv1d_fn(x, weight, bias, seq_idx=SEQ_IDX, initial_states=init, activation="silu")
    assert torch.autograd.gradcheck(f, (x, weight, bias, init), fast_mode=True)


def test_the_short_form_is_the_same_implementation():
    x, weight, bias, _ = make()
    torch.testing.assert_close(causal_conv1d(x, weight, bias, "silu", backend="torch"),
                               causal_conv1d_fn(x, weight, bias, activation="silu"), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(activation="relu"), "activation"),
    (dict(seq_idx=SEQ_IDX.float()), "seq_idx must be an int32 or int64 tensor"),
    (dict(seq_idx=SEQ_IDX[:, :4]), r"seq_idx must be \(batch=2, seqlen=9\)"),
    (dict(seq_idx=SEQ_IDX, return_final_states=True), "seq_idx cannot be combined with return_final_states"),
    (dict(initial_states=torch.zeros(2, 3, 3, dtype=F64)), r"initial_states must be \(batch, dim, width - 1\)"),
    (dict(return_final_states=True, final_states_out=torch.zeros(2, 3, dtype=F64)), "final_states_out must be"),
    (dict(bias=torch.zeros(4, dtype=F64)), r"bias must be \(dim=3,\)"),
    (dict(weight=torch.zeros(4, 3, dtype=F64)), r"weight must be \(dim=3, width\)"),
    (dict(x=torch.zeros(2, 3, 9, dtype=torch.int64)), "x must be a floating tensor"),
])
def test_bad_input_is_a_one_line_value_error(kwargs, match):
    x, weight, bias, _ = make()
    args = dict(x=x, weight=weight, bias=bias)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        causal_conv1d_fn(**args)


# --------------------------------------------------------------------------------------------
# causal_conv1d_update
# --------------------------------------------------------------------------------------------
def update_loops(x, state, weight, bias, activation, cache_seqlens):
    """-> (out (b, d, l), the new state): each step's window is the w - 1 most recent inputs then
    x[t]; the plain cache keeps the S most recent inputs in order, the ring buffer writes input
    number n at n % S (cache_seqlens[b] inputs before this call)."""
    b_, d_, l_ = x.shape
    w = weight.shape[1]
    S = state.shape[-1]
    out = torch.zeros(b_, d_, l_, dtype=F64)
    new = state.clone()
    for b in range(b_):
        if cache_seqlens is None:
            history = [new[b, :, j].clone() for j in range(S)]
        else:
            n0 = int(cache_seqlens[b])
            history = [new[b, :, (n0 - S + j) % S].clone() for j in range(S)]  # oldest first
        for t in range(l_):
            recent = history[len(history) - (w - 1):] if w > 1 else []
            for c in range(d_):
                s = float(bias[c]) if bias is not None else 0.0
                for k in range(w - 1):
                    s += float(weight[c, k]) * float(recent[k][c])
                s += float(weight[c, w - 1]) * float(x[b, c, t])
                out[b, c, t] = act(s, activation)
            history.append(x[b, :, t].to(state.dtype))
            if cache_seqlens is not None:
                new[b, :, (int(cache_seqlens[b]) + t) % S] = x[b, :, t]
        if cache_seqlens is None:
            new[b] = torch.stack(history[len(history) - S:], dim=-1) if S else new[b]
    return out, new


@pytest.mark.parametrize("seqlen", [None, 1, 3])  # None: x is (b, d)
@pytest.mark.parametrize("ring", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("state_len", [2, 5])
def test_update_matches_loops_and_writes_the_cache_in_place(seqlen, ring, activation, state_len):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, seqlen or 1, generator=g, dtype=F64)
    weight, bias = torch.randn(4, 3, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)
    state = torch.randn(3, 4, state_len, generator=g, dtype=F64)
    cache_seqlens = torch.tensor([0, 4, 11], dtype=torch.int32) if ring else None
    exp_out, exp_state = update_loops(x, state, weight, bias, activation, cache_seqlens)
    for fn in (causal_conv1d_update, causal_conv1d_update_ref):
        st = state.clone()
        out = fn(x if seqlen else x[..., 0], st, weight, bias, activation=activation, cache_seqlens=cache_seqlens)
        torch.testing.assert_close(out, exp_out if seqlen else exp_out[..., 0], rtol=1e-12, atol=1e-12)
        assert torch.equal(st, exp_state)


def test_update_with_slots_and_padding_rows():
    """conv_state_indices picks cache rows; -1 is a padding row: zero output, no row written."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 2, generator=g, dtype=torch.float32)
    weight, bias = torch.randn(3, 4, generator=g), torch.randn(3, generator=g)
    cache = torch.randn(6, 3, 5, generator=g).to(torch.float16)
    idx = torch.tensor([4, -1, 0, -1], dtype=torch.int32)
    valid = idx >= 0
    exp_out, exp_rows = update_loops(x[valid].double(), cache[idx[valid].long()].double(), weight.double(),
                                     bias.double(), "silu", None)
    got_cache = cache.clone()
    out = causal_conv1d_update(x, got_cache, weight, bias, "silu", conv_state_indices=idx)
    assert torch.equal(out[~valid], torch.zeros_like(out[~valid]))
    torch.testing.assert_close(out[valid].double(), exp_out, rtol=1e-5, atol=1e-5)
    expected_cache = cache.clone()
    expected_cache[idx[valid].long()] = exp_rows.to(torch.float16)
    assert torch.equal(got_cache, expected_cache)
    all_padding = cache.clone()
    causal_conv1d_update(x, all_padding, weight, bias, conv_state_indices=torch.full((4,), -1, dtype=torch.int32))
    assert torch.equal(all_padding, cache)


@pytest.mark.parametrize("seqlen", [None, 3])  # None: x is (b, d)
@pytest.mark.parametrize("form", ["shift", "ring", "slots"])
def test_update_c_loop_matches_loops_on_strided_float32(seqlen, form):
    """backend="torch" on CPU runs the C loop for a float32 cache: x a slice of a wider tensor, the
    cache a slice of a longer one, 16-bit x with float32 weights; ring buffer or slots with padding."""
    g = torch.Generator().manual_seed(4)
    l = seqlen or 1
    x = torch.randn(3, 4, 2 * l, generator=g)[..., ::2].to(torch.float16)
    weight, bias = torch.randn(4, 3, generator=g), torch.randn(4, generator=g)
    cache = torch.randn(5 if form == "slots" else 3, 4, 8, generator=g)[..., 1:6]  # 5 columns, strided rows
    seqlens = torch.tensor([0, 4, 11], dtype=torch.int32) if form == "ring" else None
    idx = torch.tensor([4, -1, 1]) if form == "slots" else None
    rows = idx.clamp_min(0) if idx is not None else torch.arange(3)
    exp_out, exp_rows = update_loops(x.double(), cache[rows].double(), weight.double(), bias.double(), "silu", seqlens)
    got = cache.clone()
    out = causal_conv1d_update(x if seqlen else x[..., 0], got, weight, bias, "silu", seqlens, idx, backend="torch")
    assert out.dtype == torch.float16
    valid = idx >= 0 if idx is not None else torch.ones(3, dtype=torch.bool)
    exp_out[~valid] = 0
    torch.testing.assert_close(out.double(), exp_out if seqlen else exp_out[..., 0], rtol=1e-3, atol=1e-3)
    expected = cache.clone()
    expected[rows[valid]] = exp_rows[valid].float()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seqlen", [None, 5])  # 5 steps with a 3-column cache: every column replaced
@pytest.mark.parametrize("ring", [False, True])
@pytest.mark.parametrize("activation, with_bias", [(None, False), ("silu", True)])
def test_update_c_loop_over_several_blocks_of_channels(seqlen, ring, activation, with_bias):
    """The C loop works on blocks of 64 channels: 131 channels (two whole blocks and a partial one)
    of two batch rows, against the float64 loops."""
    g = torch.Generator().manual_seed(5)
    l = seqlen or 1
    x = torch.randn(2, 131, l, generator=g)
    weight = torch.randn(131, 4, generator=g)
    bias = torch.randn(131, generator=g) if with_bias else None
    cache = torch.randn(2, 131, 3, generator=g)
    seqlens = torch.tensor([2, 7], dtype=torch.int32) if ring else None
    exp_out, exp_cache = update_loops(x.double(), cache.double(), weight.double(),
                                      None if bias is None else bias.double(), activation, seqlens)
    out = causal_conv1d_update(x if seqlen else x[..., 0], cache, weight, bias, activation, seqlens, backend="torch")
    torch.testing.assert_close(out.double(), exp_out if seqlen else exp_out[..., 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.double(), exp_cache, rtol=0, atol=0)


def test_decoding_step_by_step_equals_the_whole_conv():
    x, weight, bias, _ = make(l=7, w=4)
    whole, final = causal_conv1d_fn(x, weight, bias, return_final_states=True, activation="silu")
    state = torch.zeros(2, 3, 3, dtype=F64)
    steps = [causal_conv1d_update(x[:, :, t], state, weight, bias, "silu") for t in range(7)]
    torch.testing.assert_close(torch.stack(steps, dim=-1), whole, rtol=1e-12, atol=1e-12)
    assert torch.equal(state, final)


@pytest.mark.parametrize("kwargs, match", [
    (dict(conv_state=torch.zeros(3, 4, 1, dtype=F64)),
     r"conv_state must be \(batch=3, dim=4, state_len >= width - 1 = 2\)"),
    (dict(cache_seqlens=torch.zeros(2, dtype=torch.int32)), r"cache_seqlens must be \(batch=3,\)"),
    (dict(conv_state_indices=torch.zeros(3)), "conv_state_indices must be an int32 or int64 tensor"),
    (dict(activation="gelu"), "activation"),
])
def test_update_bad_input_is_a_one_line_value_error(kwargs, match):
    args = dict(x=torch.zeros(3, 4, dtype=F64), conv_state=torch.zeros(3, 4, 2, dtype=F64),
                weight=torch.zeros(4, 3, dtype=F64))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        causal_conv1d_update(**args)


def test_fullgraph_compile_keeps_every_form():
    x, weight, bias, init = make()
    conv = torch.compile(causal_conv1d_fn, fullgraph=True, backend="aot_eager")
    for kwargs in (dict(seq_idx=SEQ_IDX, initial_states=init), dict(initial_states=init, return_final_states=True)):
        torch.testing.assert_close(conv(x, weight, bias, activation="silu", **kwargs),
                                   causal_conv1d_ref(x, weight, bias, activation="silu", **kwargs),
                                   rtol=1e-12, atol=1e-12)
    update = torch.compile(causal_conv1d_update, fullgraph=True, backend="aot_eager")
    cache = torch.randn(5, 3, 4, dtype=F64)
    idx, seqlens = torch.tensor([3, -1], dtype=torch.int32), torch.tensor([2, 9], dtype=torch.int32)
    expected_cache = cache.clone()
    exp = causal_conv1d_update_ref(x[..., :2], expected_cache, weight, bias, "silu", seqlens, idx)
    torch.testing.assert_close(update(x[..., :2], cache, weight, bias, "silu", seqlens, idx), exp, rtol=0, atol=0)
    assert torch.equal(cache, expected_cache)
    # The C loop (float32 cache, backend="torch" on CPU) is a custom op that compile keeps whole.
    cache32, x32, w32, b32 = cache.float(), x.float(), weight.float(), bias.float()
    expected32 = cache32.clone()
    exp = causal_conv1d_update_ref(x32[..., :2], expected32, w32, b32, "silu", seqlens, idx)
    update32 = torch.compile(functools.partial(causal_conv1d_update, backend="torch"), fullgraph=True,
                             backend="aot_eager")
    torch.testing.assert_close(update32(x32[..., :2], cache32, w32, b32, "silu", seqlens, idx), exp,
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cache32, expected32, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# causal_conv1d_varlen_states
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [causal_conv1d_varlen_states, causal_conv1d_varlen_states_ref])
def test_varlen_states_are_each_sequences_last_inputs(fn):
    """Packed sequences of lengths 3, 0, 7, 1 and 5 (x a strided float16 view): each state holds its
    own sequence's last min(5, length) tokens, right-aligned, zeros before (never a neighbour's)."""
    lengths, state_len, dim = [3, 0, 7, 1, 5], 5, 4
    total = sum(lengths)
    x = torch.randn(total, 2 * dim).to(torch.float16)[:, ::2]
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)
    states = fn(x, cu, state_len)
    assert states.shape == (5, dim, state_len) and states.dtype == torch.float16
    for i, n in enumerate(lengths):
        end, take = int(cu[i + 1]), min(state_len, n)
        for col in range(state_len):
            token = end - state_len + col
            expected = x[token] if col >= state_len - take else torch.zeros(dim, dtype=torch.float16)
            assert torch.equal(states[i, :, col], expected), (i, col)


def test_varlen_states_bad_input_is_a_one_line_value_error():
    with pytest.raises(ValueError, match="cu_seqlens must be an int32 or int64"):
        causal_conv1d_varlen_states(torch.zeros(4, 2), torch.tensor([0.0, 4.0]), 3)
    with pytest.raises(ValueError, match="state_len must be an int >= 0"):
        causal_conv1d_varlen_states(torch.zeros(4, 2), torch.tensor([0, 4]), -1)
