"""The device's own limits, measured in the same run as the kernels (group ``yardstick``).

* ``copy``: ``dst.copy_(src)`` of 256 MiB (CUDA) / 64 MiB (CPU); ``extra_info["gbps"]`` counts
  bytes read plus written, the bandwidth a streaming kernel can hope for;
* ``matmul``: a square product in float32 (IEEE: TF32 off, as our kernels run float32) and in
  bfloat16; ``extra_info["tflops"]``, the compute peak our GEMM-bound kernels are set against.

``bench/report.py`` divides the kernels' times by the floors these give
(``max(bytes / gbps, flops / tflops)``). ``--quick`` shrinks both so CI only checks the code runs.
"""
from __future__ import annotations

import pytest
import torch

from m2restore_kernels.testing import assert_close_rel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _median_s(benchmark) -> float:
    # pytest-benchmark keeps no stats under --benchmark-disable: then the rate is not recorded
    return benchmark.stats.stats.median if benchmark.stats is not None else float("nan")


@pytest.mark.benchmark(group="yardstick")
def test_copy_bandwidth(bench, benchmark, quick, device):
    mib = 1 if quick else (256 if device.type == "cuda" else 64)
    src = torch.randn(mib * 2**18, device=device)
    dst = torch.empty_like(src)
    bench(lambda: dst.copy_(src))
    assert torch.equal(dst, src)
    moved = 2 * src.numel() * src.element_size()
    benchmark.extra_info.update(mb=moved / 2**20, gbps=round(moved / _median_s(benchmark) / 1e9, 1))


@pytest.mark.benchmark(group="yardstick")
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_matmul_peak(bench, benchmark, quick, device, dtype):
    n = 256 if quick else (8192 if device.type == "cuda" else 2048)
    a, b = (torch.randn(n, n, device=device, dtype=DTYPES[dtype]) for _ in range(2))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        out = bench(lambda: a @ b)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    # Four rows against float64: enough to catch a wrong product, cheap at any n.
    assert_close_rel(out[:4], a[:4].double() @ b.double(), "matmul", dtype)
    benchmark.extra_info.update(n=n, dtype=dtype, tflops=round(2 * n**3 / _median_s(benchmark) / 1e12, 2))
