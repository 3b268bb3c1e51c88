"""The one place that decides the backend: kernels/_backend.py."""
import importlib
import math
import os
import subprocess
import sys

import pytest
import torch

import m2restore_kernels._backend as backend_module
from m2restore_kernels._backend import extension_op, optional_op, resolve_backend

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


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


def test_extension_ops_are_used_only_by_auto_on_cuda(monkeypatch):
    assert optional_op("math", "sqrt") is math.sqrt
    assert optional_op("no_such_package_m2r", "fn") is None
    assert extension_op("auto", CUDA, "math", "sqrt") is math.sqrt
    assert extension_op("torch", CUDA, "math", "sqrt") is None
    assert extension_op("triton", CUDA, "math", "sqrt") is None
    # CPU tensors never even try the import (mamba-ssm cannot import without its CUDA build).
    def no_import(module, name):
        raise AssertionError(f"tried to import {module}")

    monkeypatch.setattr(backend_module, "optional_op", no_import)
    assert extension_op("auto", CPU, "math", "sqrt") is None



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
