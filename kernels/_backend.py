"""The one place that decides which implementation an op runs.

``backend="auto"`` picks Triton for CUDA tensors, and for CPU tensors when the Triton
interpreter is on (``TRITON_INTERPRET=1``, which must be set before triton is imported);
otherwise the PyTorch path. ``"triton"`` and ``"torch"`` force one path.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")


# Looked up once at import: a module constant is also what torch.compile traces through cleanly.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_INSTALLED


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """Return ``"triton"`` or ``"torch"`` for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    runnable = triton_available() and (device.type == "cuda" or (device.type == "cpu" and interpreter_on()))
    if backend == "triton" and not runnable:
        raise ValueError(
            f"backend='triton' needs triton and CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
            f"got tensors on {device}, triton installed: {triton_available()}"
        )
    return "triton" if runnable else "torch"


@functools.lru_cache(maxsize=None)
def optional_op(module: str, name: str):
    """``module.name`` from an optional CUDA extension package (mamba-ssm, causal-conv1d), or None
    when it does not import (not installed, or built for another torch/CUDA)."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, OSError, AttributeError):
        return None


def extension_op(backend: str, device: torch.device, module: str, name: str):
    """The extension's op where ``backend="auto"`` should run it (CUDA tensors, package importable),
    else None and the caller runs its own path. Never imports the package for CPU tensors."""
    if backend != "auto" or device.type != "cuda":
        return None
    return optional_op(module, name)
