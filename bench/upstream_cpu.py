"""pytest plugin: mamba-ssm's and causal-conv1d's own test files, unchanged, on a CPU through
``apply_to_mamba_ssm()`` (``bench/run_upstream_suites.sh`` uses it: ``-p upstream_cpu``).

Their tests hardcode ``device = "cuda"``. Without a GPU, a TorchFunctionMode active around each test
puts the tensors they create with ``device="cuda"`` (factories, ``.to``, ``.cuda()``) on the CPU
instead: the only change to what they run. On a CUDA machine the plugin only makes the call, and
the tests run as written (CUDA tensors then take upstream's extensions where they import, else ours).
``--every N`` keeps every N-th parametrisation of each test function (tests/test_upstream_suites.py
runs causal-conv1d's file so in CI).
"""
from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import m2restore_kernels


def _is_cuda(value) -> bool:
    return (isinstance(value, str) and value.startswith("cuda")) or (
        isinstance(value, torch.device) and value.type == "cuda")


class CudaToCpu(TorchFunctionMode):
    """Every device="cuda" becomes the CPU; ``Tensor.cuda()`` returns the tensor."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        args = tuple("cpu" if _is_cuda(a) else a for a in args)
        return func(*args, **kwargs)


def pytest_addoption(parser):
    parser.addoption("--every", type=int, default=1, metavar="N",
                     help="run every N-th parametrisation of each test function (its first always), the rest "
                          "deselected: a spread-out sample of a long sweep")


def pytest_collection_modifyitems(config, items):
    every = config.getoption("--every")
    if every <= 1:
        return
    seen, keep, drop = {}, [], []
    for item in items:
        name = item.originalname if hasattr(item, "originalname") else item.name
        index = seen[name] = seen.get(name, -1) + 1
        (keep if index % every == 0 else drop).append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep


def pytest_configure(config):
    summary = m2restore_kernels.apply_to_mamba_ssm()
    print("apply_to_mamba_ssm:", {k: v for k, v in summary.items() if k != "rebound"},
          f"{len(summary['rebound'])} names rebound")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    if torch.cuda.is_available():
        yield
        return
    with CudaToCpu():
        yield
