"""The one place that decides the backend: kernels/m2restore_kernels/_backend.py."""
import importlib
import math
import os
import subprocess
import sys

import pytest
import torch

import m2restore_kernels._backend as backend_module
from m2restore_kernels import selective_state_update
from m2restore_kernels._backend import (DISABLE_ENV, Available, disabled_impls, optional_op, probe, resolve_backend,
                                        resolve_impl)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
EVERYTHING = Available(triton=True, interpreter=True, native=True, extension=True)
NO_INTERPRETER = Available(triton=True, interpreter=False, native=True, extension=True)
NO_TRITON = Available(triton=False, interpreter=True, native=True, extension=False)
NO_NATIVE = Available(triton=True, interpreter=False, native=False, extension=False)
BARE = Available(triton=False, interpreter=False, native=False, extension=False)
NATIVE_OFF = Available(triton=True, interpreter=False, native=True, extension=True, disabled=frozenset({"native"}))
TRITON_OFF = Available(triton=True, interpreter=True, native=True, extension=True, disabled=frozenset({"triton"}))
EXT_OFF = Available(triton=True, interpreter=False, native=True, extension=True, disabled=frozenset({"extension"}))


# (op, device, dtype, backend, available) -> implementation, or the ValueError's message fragment.
RESOLUTION_TABLE = [
    # auto: extension on CUDA where it imports, else Triton where it runs, else C on CPU, else PyTorch
    ("selective_scan", CUDA, F32, "auto", EVERYTHING, "extension"),
    ("selective_scan", CUDA, F32, "auto", EXT_OFF, "triton"),
    ("causal_conv1d", CUDA, BF16, "auto", EVERYTHING, "extension"),
    ("causal_conv1d", CUDA, BF16, "auto", EXT_OFF, "torch"),
    ("moe_mlp", CUDA, BF16, "auto", EVERYTHING, "triton"),  # no extension for the MoE
    ("selective_scan", CPU, F32, "auto", EVERYTHING, "triton"),  # interpreter on
    ("selective_scan", CPU, F32, "auto", NO_INTERPRETER, "native"),
    ("selective_scan", CPU, F64, "auto", NO_INTERPRETER, "torch"),  # the C scan computes in float32
    ("selective_scan", CPU, BF16, "auto", NO_NATIVE, "torch"),
    # float64: the Triton kernels, the C loops and the CUDA packages compute in float32 at most
    ("moe_mlp", CPU, F64, "auto", NO_INTERPRETER, "torch"),
    ("moe_mlp", CUDA, F64, "auto", EVERYTHING, "torch"),
    ("topk_softmax", CPU, F64, "auto", EVERYTHING, "torch"),  # interpreter on
    ("topk_softmax", CPU, F16, "auto", NO_INTERPRETER, "native"),  # 16-bit converts to float32 exactly
    ("gated_fusion", CUDA, F64, "auto", EVERYTHING, "torch"),
    ("causal_conv1d", CUDA, F64, "auto", EVERYTHING, "torch"),
    ("moe_mlp", CUDA, F64, "triton", EVERYTHING, ValueError("does not take torch.float64")),
    ("topk_softmax", CPU, F64, "triton", EVERYTHING, ValueError("backend='torch' or 'auto' computes torch.float64")),
    ("gated_fusion", CUDA, F64, "triton", EVERYTHING, ValueError("does not take torch.float64")),
    ("causal_conv1d", CUDA, F64, "triton", EVERYTHING, "torch"),  # no Triton kernels: its PyTorch path
    ("moe_mlp", CUDA, BF16, "triton", EVERYTHING, "triton"),
    ("topk_softmax", CPU, F32, "auto", NO_TRITON, "native"),
    ("gated_fusion", CPU, F32, "auto", NO_INTERPRETER, "torch"),  # no C loop
    ("gated_fusion", CPU, F32, "auto", TRITON_OFF, "torch"),
    ("gated_fusion", CUDA, F32, "auto", BARE, "torch"),
    # torch: never Triton nor an extension; the C loop on CPU where it builds and is not switched off
    ("selective_scan", CPU, F32, "torch", EVERYTHING, "native"),
    ("selective_scan", CPU, F32, "torch", NATIVE_OFF, "torch"),
    ("selective_scan", CUDA, F32, "torch", EVERYTHING, "torch"),
    ("moe_mlp", CPU, BF16, "torch", NO_NATIVE, "torch"),
    ("causal_conv1d", CUDA, F32, "torch", EVERYTHING, "torch"),
    # triton: Triton where it runs (ops without kernels run PyTorch), else a one-line ValueError
    ("moe_mlp", CUDA, F32, "triton", EVERYTHING, "triton"),
    ("selective_scan", CUDA, F32, "triton", EVERYTHING, "triton"),
    ("causal_conv1d", CPU, F32, "triton", EVERYTHING, "torch"),
    ("topk_softmax", CPU, F32, "triton", NO_INTERPRETER, ValueError("TRITON_INTERPRET=1")),
    ("moe_mlp", CUDA, F32, "triton", NO_TRITON, ValueError("installed: False")),
    ("gated_fusion", CPU, F32, "triton", TRITON_OFF, ValueError(DISABLE_ENV)),
    ("selective_scan", CPU, F32, "cuda", EVERYTHING, ValueError("backend must be one of")),
]


@pytest.mark.parametrize("op,device,dtype,backend,available,expected", RESOLUTION_TABLE,
                         ids=[f"{r[0]}-{r[1].type}-{str(r[2])[6:]}-{r[3]}-{i}" for i, r in enumerate(RESOLUTION_TABLE)])
def test_resolution_table(op, device, dtype, backend, available, expected):
    if isinstance(expected, ValueError):
        with pytest.raises(ValueError, match=str(expected)) as info:
            resolve_impl(op, device, dtype, backend, available)
        assert "\n" not in str(info.value)
        return
    assert resolve_impl(op, device, dtype, backend, available) == expected


def test_forced_triton_error_names_what_works():
    with pytest.raises(ValueError, match="backend='torch' or 'auto' runs there"):
        resolve_impl("moe_mlp", CPU, F32, "triton", NO_INTERPRETER)


def test_native_is_skipped_where_the_arguments_do_not_fit_it():
    """topk_softmax's C loop takes rows of at most 64 logits: wider ones run PyTorch."""
    assert resolve_impl("topk_softmax", CPU, F32, "torch", EVERYTHING, native_ok=False) == "torch"


@pytest.mark.parametrize("env,expected", [
    ({}, set()),
    ({"M2RESTORE_NATIVE": "0"}, {"native"}),
    ({DISABLE_ENV: "native, extension"}, {"native", "extension"}),
    ({DISABLE_ENV: "triton", "M2RESTORE_NATIVE": "0"}, {"triton", "native"}),
])
def test_disable_override_and_its_alias(env, expected, monkeypatch):
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    monkeypatch.delenv("M2RESTORE_NATIVE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert disabled_impls() == expected


def test_disable_override_rejects_unknown_names(monkeypatch):
    monkeypatch.setenv(DISABLE_ENV, "torch")
    with pytest.raises(ValueError, match=DISABLE_ENV):
        disabled_impls()


def test_probe_reads_the_machine_and_the_override(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(DISABLE_ENV, "native")
    have = probe("selective_scan", CPU, "torch")
    assert have.interpreter and not have.native and have.disabled == {"native"}
    assert resolve_impl("selective_scan", CPU, F32, "torch") == "torch"


def test_cached_decisions_follow_the_environment_at_run_time(monkeypatch):
    """resolve_impl keeps its decisions per environment value: one changed between two calls (after
    the first has been cached) decides the second, and changing it back restores the first; the
    decode step that asks it follows."""
    ss_native = importlib.import_module("m2restore_kernels.selective_scan.native_impl")
    if not backend_module.native_ready(ss_native.LIBRARY):
        pytest.skip("no working C compiler here")
    for name in (DISABLE_ENV, "M2RESTORE_NATIVE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")

    def impl():
        return resolve_impl("selective_state_update", CPU, F32, "auto")

    assert impl() == impl() == "native"
    for name, value, expected in ((DISABLE_ENV, "native", "torch"), ("M2RESTORE_NATIVE", "0", "torch"),
                                  ("TRITON_INTERPRET", "1", "triton" if backend_module.triton_available() else "native")):
        monkeypatch.setenv(name, value)
        assert impl() == expected, name
        monkeypatch.delenv(name)
        assert impl() == "native", name
    calls = []
    step = ss_native.selective_state_update
    monkeypatch.setattr(ss_native, "selective_state_update", lambda *a: calls.append(1) or step(*a))
    a = dict(state=torch.zeros(1, 2, 3), x=torch.ones(1, 2), dt=torch.ones(1, 2), A=-torch.ones(2, 3),
             B=torch.ones(1, 3), C=torch.ones(1, 3))
    out = selective_state_update(**a)
    monkeypatch.setenv(DISABLE_ENV, "native")
    again = selective_state_update(**{**a, "state": torch.zeros(1, 2, 3)})
    assert calls == [1] and torch.allclose(out, again)


def test_resolve_backend_picks_triton_on_cpu_only_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", CPU) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_backend("auto", CPU) == "torch"
    assert resolve_backend("torch", CUDA) == "torch"
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        resolve_backend("triton", CPU)
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda", CPU)


def test_extension_packages_are_imported_only_for_auto_on_cuda(monkeypatch):
    assert optional_op("math", "sqrt") is math.sqrt
    assert optional_op("no_such_package_m2r", "fn") is None
    # CPU tensors, or a backend other than "auto", never even try the import (mamba-ssm cannot
    # import without its CUDA build).
    def no_import(module, name):
        raise AssertionError(f"tried to import {module}")

    monkeypatch.setattr(backend_module, "optional_op", no_import)
    assert not probe("selective_scan", CPU, "auto").extension
    assert not probe("selective_scan", CUDA, "torch").extension
    assert not probe("causal_conv1d", CUDA, "triton").extension


def test_kernels_import_and_run_their_torch_paths_without_triton():
    # Triton is Linux-only: elsewhere the package must still import, and "auto" must fall back to
    # PyTorch even with TRITON_INTERPRET=1 set.
    script = """
import sys
sys.modules["triton"] = None  # as if not installed: import fails, find_spec returns None
import torch
import m2restore_kernels as K
assert K.resolve_backend("auto", torch.device("cpu")) == "torch"
torch.manual_seed(0)
gf = (torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5), torch.randn(2, 3), torch.randn(3, 1, 3, 3), None,
      torch.randn(3, 3), None, torch.randn(1, 3), None)
assert torch.allclose(K.gated_fusion(*gf), K.gated_fusion_ref(*gf), atol=1e-5)
w, i = K.topk_softmax(torch.randn(7, 4), 2)
moe = (torch.randn(7, 8), w, i, torch.randn(4, 8, 5), None, torch.randn(4, 5, 8), None)
assert torch.allclose(K.moe_mlp(*moe), K.moe_mlp_ref(*moe), atol=1e-5)
scan = (torch.randn(1, 4, 6), torch.rand(1, 4, 6), -torch.rand(4, 2), torch.randn(1, 2, 6), torch.randn(1, 2, 6))
assert torch.allclose(K.selective_scan(*scan), K.selective_scan_ref(*scan), atol=1e-5)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr


def test_float32_dot_precision_follows_torch_and_the_override(monkeypatch):
    """float32 tl.dot: 3xTF32 by default, TF32 when torch allows it, the override above both; the
    interpreter and 16-bit operands always IEEE / their own."""
    triton_helpers = importlib.import_module("m2restore_kernels._triton")
    monkeypatch.setattr(triton_helpers, "interpreter_on", lambda: False)
    monkeypatch.delenv("M2RESTORE_FP32_DOT", raising=False)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert triton_helpers.dot_precision(torch.float32) == "tf32x3"
        torch.set_float32_matmul_precision("high")
        assert triton_helpers.dot_precision(torch.float32) == "tf32"
        monkeypatch.setenv("M2RESTORE_FP32_DOT", "ieee")
        assert triton_helpers.dot_precision(torch.float32) == "ieee"
        assert triton_helpers.dot_precision(torch.bfloat16) == "ieee"  # ignored by 16-bit dots
        monkeypatch.setenv("M2RESTORE_FP32_DOT", "fast")
        with pytest.raises(ValueError, match="M2RESTORE_FP32_DOT"):
            triton_helpers.dot_precision(torch.float32)
    finally:
        torch.set_float32_matmul_precision(previous)
    monkeypatch.setattr(triton_helpers, "interpreter_on", lambda: True)
    monkeypatch.delenv("M2RESTORE_FP32_DOT")
    assert triton_helpers.dot_precision(torch.float32) == "ieee"


def test_version_follows_the_distribution():
    """``m2restore_kernels.__version__`` is the installed m2restore distribution's version (pyproject's),
    or a marker that says it is not installed."""
    import re
    from importlib import metadata
    from pathlib import Path

    import m2restore_kernels

    try:
        installed = metadata.version("m2restore")
    except metadata.PackageNotFoundError:
        assert m2restore_kernels.__version__ == "0+unknown"
        return
    assert m2restore_kernels.__version__ == installed
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1) == installed

