"""causal_conv1d: the dtype and NaN rules of its docstring, and the call into the causal-conv1d package."""
from __future__ import annotations

import importlib
import math

import pytest
import torch

from m2restore_kernels.causal_conv1d import causal_conv1d, causal_conv1d_ref

conv = importlib.import_module("m2restore_kernels.causal_conv1d")


def by_loops(x, weight, bias, silu):
    """out[b, c, t] = act(bias[c] + sum_k weight[c, k] x[b, c, t - (w - 1) + k]) in float64 Python loops."""
    B, D, L = x.shape
    w = weight.shape[1]
    out = torch.zeros(B, D, L, dtype=torch.float64)
    for b in range(B):
        for c in range(D):
            for t in range(L):
                s = float(bias[c])
                for k in range(w):
                    if t - (w - 1) + k >= 0:
                        s += float(weight[c, k]) * float(x[b, c, t - (w - 1) + k])
                out[b, c, t] = s / (1 + math.exp(-s)) if silu else s
    return out


@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
def test_float64_is_computed_in_float64_on_every_backend(backend):
    """No Triton kernels here: "triton" runs the PyTorch conv, which keeps float64."""
    g = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((2, 3, 9), (3, 4), (3,)))
    out = causal_conv1d(x, weight, bias, "silu", backend=backend)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, by_loops(x, weight, bias, silu=True), rtol=1e-13, atol=1e-14)


def test_nan_reaches_the_next_width_steps_only():
    x, weight = torch.randn(1, 2, 10), torch.randn(2, 3)
    x[0, 1, 4] = float("nan")
    out = causal_conv1d(x, weight, None, None)
    spoilt = torch.zeros(1, 2, 10, dtype=torch.bool)
    spoilt[0, 1, 4:7] = True
    assert torch.equal(out.isnan(), spoilt)


def test_bad_input_is_a_one_line_value_error():
    with pytest.raises(ValueError, match="x must be a floating tensor"):
        causal_conv1d(torch.zeros(1, 2, 5, dtype=torch.int64), torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"weight must be \(dim=2, width\)"):
        causal_conv1d(torch.randn(1, 2, 5), torch.randn(3, 3))


def test_the_activation_goes_to_the_package_by_name(monkeypatch):
    """causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
    final_states_out=None, activation=None): a positional fourth argument would be taken as seq_idx.
    The package is faked with that signature, its body the reference."""
    def fake_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                final_states_out=None, activation=None):
        assert seq_idx is None and initial_states is None
        return causal_conv1d_ref(x, weight, bias, activation=activation)

    monkeypatch.setattr(conv, "resolve_impl", lambda *a, **k: "extension")
    monkeypatch.setattr(conv, "optional_op", lambda module, name: fake_fn)
    x, weight, bias = torch.randn(2, 3, 9), torch.randn(3, 4), torch.randn(3)
    torch.testing.assert_close(causal_conv1d(x, weight, bias, "silu"), causal_conv1d_ref(x, weight, bias, activation="silu"))
