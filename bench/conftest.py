"""Benchmark fixtures shared by every group in bench/.

``bench(fn)`` times ``fn()`` with pytest-benchmark, synchronising CUDA after each call and
warming up first; ``--quick`` (root conftest) cuts rounds so CI only checks that the suite runs.
Peak memory (CUDA allocator, else process RSS high-water mark) goes into ``extra_info``.
"""
from __future__ import annotations

import os
import platform
import resource

import pytest
import torch

from m2restore.allocator import retain_freed_memory
from m2restore.benchmark import cpu_model


def pytest_configure(config):
    # As the m2restore command runs: every variant of a group then sees the same allocator, instead
    # of one that page-faults large tensors in depending on which variant freed memory before it.
    retain_freed_memory()


def pytest_benchmark_generate_machine_info(config):
    """The JSON's machine facts, without py-cpuinfo: its subprocess took seconds on a 16-core GPU
    machine, at the very end of the run, where a time limit then cost the whole JSON. Adds what
    these numbers depend on: the GPU, torch, triton."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "node": platform.node(), "machine": platform.machine(), "system": platform.system(),
        "release": platform.release(), "python_implementation": platform.python_implementation(),
        "python_version": platform.python_version(),
        "cpu": {"brand_raw": cpu_model(), "count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__, "triton": triton_version,
    }


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # kB on Linux


@pytest.fixture
def bench(benchmark, quick, device):
    """``bench(fn, rounds=None)``: time ``fn()``; returns its last result."""

    def run(fn, rounds: int | None = None):
        def call():
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return out

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        n = 1 if quick else (rounds or (20 if device.type == "cuda" else 5))
        # A single round is for cases too slow to repeat (sequential references): no warm-up either.
        try:
            out = benchmark.pedantic(call, rounds=n, iterations=1, warmup_rounds=0 if n == 1 else 2)
        except KeyboardInterrupt:
            # Stopped mid-case (Ctrl-C, or `timeout` via the root conftest): pytest-benchmark only
            # marks failures of type Exception, and an unmarked case without rounds stops it from
            # writing the JSON of every case that did finish.
            benchmark.has_error = True
            raise
        benchmark.extra_info["device"] = (
            torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
        )
        benchmark.extra_info["peak_mem_mb"] = round(_peak_memory_mb(device), 1)
        return out

    return run
