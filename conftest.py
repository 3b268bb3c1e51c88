"""Shared pytest setup for tests/ and bench/.

On a machine without CUDA, Triton kernels run through Triton's interpreter on CPU tensors.
The variable must be set before triton is first imported, hence here, at the root.
"""
import os
import signal

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist (`-n N`, the README's test command) each worker gets its share of the cores
    # for PyTorch's intra-op pool (the C kernels take torch.get_num_threads() too), and so do the
    # processes its tests start (CLI runs, DDP ranks) through OMP_NUM_THREADS: N workers with a pool
    # of every core each would oversubscribe them, and OpenMP threads spin while they wait.
    share = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(share))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_addoption(parser):
    parser.addoption(
        "--quick", action="store_true", default=False,
        help="benchmarks: small sizes and few rounds (what CI runs so the suite cannot rot)",
    )


@pytest.fixture(scope="session")
def quick(request) -> bool:
    return bool(request.config.getoption("--quick"))


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config):
    # A run stopped by `timeout` (SIGTERM) ends like Ctrl-C: pytest still finishes the session, so
    # the benchmark JSON and JUnit XML of what did run are written (bench/gpu_check.sh relies on it).
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)
    if config.getoption("--quick"):
        _hypothesis_fixed_examples()


def _hypothesis_fixed_examples():
    """``--quick`` (CI) draws hypothesis' examples from a fixed seed: a landing must not hang on
    an example no earlier run met. Runs without it keep exploring new ones (and replay the
    failures they found from .hypothesis/)."""
    try:
        from hypothesis import settings
    except ImportError:  # the test extra is not installed: nothing uses hypothesis
        return
    settings.register_profile("m2restore-quick", derandomize=True)
    settings.load_profile("m2restore-quick")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
