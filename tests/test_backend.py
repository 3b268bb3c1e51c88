"""The one place that decides the backend: kernels/_backend.py."""
import math

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
