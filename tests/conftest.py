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
