"""Parity tests compare float32 results with float64 references at 1e-5: on CUDA that needs IEEE
float32 in cuDNN too (its convolutions default to TF32; matmuls already default to IEEE)."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _ieee_float32_convolutions():
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = previous
