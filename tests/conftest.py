"""Parity tests compare float32 results with float64 references at 1e-5 (docs/design.md#tolerances,
``m2restore_kernels.testing``): on CUDA that needs IEEE float32 in cuDNN too (its convolutions
default to TF32; matmuls already default to IEEE), and Triton's float32 dots in IEEE mode (the
package's default, 3xTF32, has tests of its own)."""
import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _ieee_float32():
    previous = torch.backends.cudnn.allow_tf32, os.environ.get("M2RESTORE_FP32_DOT")
    torch.backends.cudnn.allow_tf32 = False
    os.environ["M2RESTORE_FP32_DOT"] = "ieee"
    yield
    torch.backends.cudnn.allow_tf32 = previous[0]
    if previous[1] is None:
        os.environ.pop("M2RESTORE_FP32_DOT", None)
    else:
        os.environ["M2RESTORE_FP32_DOT"] = previous[1]


@pytest.fixture(params=["native", "chunked"])
def scan_torch_impl(request, monkeypatch):
    """Runs a selective-scan test with one implementation behind backend="torch" (the C loop, or the
    chunked PyTorch scan with the C loop disabled) and checks that it was the one used."""
    import importlib

    from m2restore_kernels._backend import DISABLE_ENV, native_ready

    ss_native = importlib.import_module("m2restore_kernels.selective_scan.native_impl")
    ss_torch = importlib.import_module("m2restore_kernels.selective_scan.torch_impl")
    calls = []
    if request.param == "native":
        if torch.cuda.is_available():
            pytest.skip("the C scan serves CPU tensors; the parity tests use CUDA ones here")
        if not native_ready(ss_native.LIBRARY):
            pytest.skip("no working C compiler here: backend='torch' runs the chunked scan")
        fwd = ss_native.selective_scan_fwd
        monkeypatch.setattr(ss_native, "selective_scan_fwd", lambda *a: calls.append(1) or fwd(*a))
    else:
        monkeypatch.setenv(DISABLE_ENV, "native")
        fwd = ss_torch.selective_scan_fwd
        monkeypatch.setattr(ss_torch, "selective_scan_fwd", lambda *a, **k: calls.append(1) or fwd(*a, **k))
    yield request.param
    assert calls, f"the {request.param} implementation never ran"
