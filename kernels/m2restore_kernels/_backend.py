"""The one place that decides which implementation an op runs.

Users ask for a backend, ``"auto" | "triton" | "torch"``; :func:`resolve_impl` turns that request,
the op, the tensors' device and dtype and what this machine has into one implementation:

* ``"extension"``: an optional CUDA package's own kernel (mamba-ssm, causal-conv1d), only for
  ``"auto"`` on CUDA tensors, and only imported then;
* ``"triton"``: the op's Triton kernels, on CUDA tensors, or CPU tensors when the Triton
  interpreter is on (``TRITON_INTERPRET=1``, set before triton is imported);
* ``"native"``: the op's C loop for CPU tensors (``csrc/``, built on first use by ``_native``);
* ``"torch"``: PyTorch ops, which run everywhere.

``"auto"`` takes the first of those that runs and takes the tensors' dtype; ``"triton"`` insists
on Triton (an op without Triton kernels, such as ``causal_conv1d``, then runs its PyTorch path);
``"torch"`` means "no Triton": the C loop on CPU where it builds, else PyTorch ops.

Dtypes: each implementation lists the dtypes it computes correctly (``OpImpls``). The Triton
kernels of the MoE and the gated fusion, the C loops and the CUDA packages compute in float32 at
most, so float64 goes to the PyTorch path under ``"auto"``, and ``"triton"`` refuses it with a
ValueError that names the dtype and ``backend="torch"`` rather than return float32-rounded results.

One environment variable takes implementations away everywhere:
``M2RESTORE_KERNELS_DISABLE=native,extension,triton`` (any subset; ``"torch"`` is the fallback and
cannot be disabled). ``M2RESTORE_NATIVE=0`` is an alias for disabling ``native``.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Optional

import torch

BACKENDS = ("auto", "triton", "torch")
IMPLS = ("triton", "native", "torch", "extension")
DISABLE_ENV = "M2RESTORE_KERNELS_DISABLE"
DISABLEABLE = ("triton", "native", "extension")


ALL_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
UP_TO_FLOAT32 = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class OpImpls:
    """What one op has besides its PyTorch path (which takes every floating dtype): Triton kernels,
    a C library (``csrc/<native>.c``), an optional CUDA package's function ``(module, name)``, and
    the dtypes each of them computes correctly."""
    triton: bool = True
    native: Optional[str] = None
    extension: Optional[tuple] = None
    triton_dtypes: tuple = ALL_FLOATS
    native_dtypes: tuple = ALL_FLOATS
    extension_dtypes: tuple = ALL_FLOATS


# The MoE's and the gated fusion's kernels and the C loops (MoE routing and combination, the scan's
# recurrence) compute in float32: float64 keeps the float64 PyTorch path. causal_conv1d's package
# takes 16-bit and float32 only.
OPS = {
    "topk_softmax": OpImpls(native="moe_cpu", triton_dtypes=UP_TO_FLOAT32, native_dtypes=UP_TO_FLOAT32),
    "moe_mlp": OpImpls(native="moe_cpu", triton_dtypes=UP_TO_FLOAT32, native_dtypes=UP_TO_FLOAT32),
    "gated_fusion": OpImpls(triton_dtypes=UP_TO_FLOAT32),
    "selective_scan": OpImpls(native="selective_scan_cpu", native_dtypes=UP_TO_FLOAT32,
                              extension=("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn")),
    "causal_conv1d": OpImpls(triton=False, extension=("causal_conv1d", "causal_conv1d_fn"),
                             extension_dtypes=UP_TO_FLOAT32),
    # The decode steps: C loops on CPU (float32 compute, the state kept in float32); the scan's also
    # a Triton kernel; the conv's is PyTorch elsewhere (a gather, one small conv, an in-place write).
    "causal_conv1d_update": OpImpls(triton=False, native="causal_conv1d_cpu", native_dtypes=UP_TO_FLOAT32),
    "selective_state_update": OpImpls(native="selective_scan_cpu", triton_dtypes=UP_TO_FLOAT32,
                                      native_dtypes=UP_TO_FLOAT32),
}


# Looked up once at import: a module constant is also what torch.compile traces through cleanly.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_INSTALLED


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def disabled_impls() -> frozenset:
    """The implementations switched off by ``M2RESTORE_KERNELS_DISABLE`` (and ``M2RESTORE_NATIVE=0``),
    read at every call (a process may change them), parsed once per value."""
    return _parse_disabled(os.environ.get(DISABLE_ENV, ""), os.environ.get("M2RESTORE_NATIVE", "1"))


@functools.lru_cache(maxsize=16)
def _parse_disabled(spec: str, native: str) -> frozenset:
    names = {s.strip() for s in spec.split(",") if s.strip()}
    unknown = names - set(DISABLEABLE)
    if unknown:
        raise ValueError(f"{DISABLE_ENV} may name {DISABLEABLE}, got {sorted(unknown)}")
    if native == "0":
        names.add("native")
    return frozenset(names)


@dataclass(frozen=True)
class Available:
    """What this machine offers, as far as the resolver needs it (the table tests pass their own)."""
    triton: bool           # triton imports
    interpreter: bool      # TRITON_INTERPRET=1
    native: bool           # the op's C library builds and loads
    extension: bool        # the op's CUDA package imports
    disabled: frozenset = frozenset()


@torch.compiler.assume_constant_result
def native_ready(library: str) -> bool:
    """Whether ``csrc/<library>.c`` builds (or is built) here; a constant for torch.compile."""
    from . import _native  # imported late: _native reads disabled_impls from this module

    return _native.load(library) is not None


@functools.lru_cache(maxsize=None)
def optional_op(module: str, name: str):
    """``module.name`` from an optional CUDA extension package (mamba-ssm, causal-conv1d), or None
    when it does not import (not installed, or built for another torch/CUDA). Where
    ``integrations.mamba_ssm.apply_to_mamba_ssm`` rebound the name to its dispatcher, the upstream
    function that dispatcher keeps for CUDA (None without the extension): never ourselves again."""
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, OSError, AttributeError):
        return None
    return getattr(fn, "__m2restore_upstream__", fn)


def probe(op: str, device: torch.device, backend: str) -> Available:
    """What runs ``op`` here. Builds the C library only for CPU tensors and imports an extension
    package only for ``backend="auto"`` on CUDA tensors (mamba-ssm cannot import without its CUDA build)."""
    spec = OPS[op]
    disabled = disabled_impls()
    native = (spec.native is not None and device.type == "cpu" and "native" not in disabled
              and native_ready(spec.native))
    extension = (spec.extension is not None and backend == "auto" and device.type == "cuda"
                 and "extension" not in disabled and optional_op(*spec.extension) is not None)
    return Available(triton=triton_available(), interpreter=interpreter_on(), native=native, extension=extension,
                     disabled=disabled)


# resolve_impl's decisions: (op, device type, dtype, backend, native_ok, the environment values it
# reads) -> implementation. The rest of what probe sees is fixed for the process (the C libraries and
# the extension packages are looked up once), so a decision holds until one of those values
# changes; a decode step then pays a dict lookup, not a probe.
_DECISIONS: dict = {}
_DECISIONS_MAX = 1024  # a process cycling through environment values must not grow it without end
_ENV = (DISABLE_ENV, "M2RESTORE_NATIVE", "TRITON_INTERPRET")
# The key reads those values from os.environ's own store, which every change through os.environ
# updates: os.environ.get costs a few Python calls and, for an unset name, a caught KeyError, which
# together cost more than the rest of a decode step's decision (CPython's os._Environ has kept
# _data and encodekey since 3.2; elsewhere, os.environ.get).
_ENV_STORE = getattr(os.environ, "_data", None)
_ENV_KEYS = tuple(os.environ.encodekey(name) for name in _ENV) if _ENV_STORE is not None else _ENV


def resolve_impl(op: str, device: torch.device, dtype: torch.dtype, backend: str = "auto",
                 available: Optional[Available] = None, native_ok: bool = True) -> str:
    """The implementation of ``op`` for tensors on ``device`` computed from ``dtype``:
    ``"extension" | "triton" | "native" | "torch"``. ``available`` defaults to :func:`probe`'s
    (the decision is then cached per op, device type, dtype, backend, ``native_ok`` and the values
    of ``M2RESTORE_KERNELS_DISABLE``, ``M2RESTORE_NATIVE`` and ``TRITON_INTERPRET``, read at every
    call); ``native_ok=False`` when the C loop cannot take these arguments (a size over its limit).
    Raises a one-line ValueError for an unknown backend or a forced one that cannot run (on these
    tensors, or in this dtype)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if available is not None or torch.compiler.is_compiling():  # traced: no dict for Dynamo to guard on
        return _decide(op, device, dtype, backend,
                       available if available is not None else probe(op, device, backend), native_ok)
    store = _ENV_STORE if _ENV_STORE is not None else os.environ
    key = (op, device.type, dtype, backend, native_ok, *[store.get(name) for name in _ENV_KEYS])
    impl = _DECISIONS.get(key)
    if impl is None:
        impl = _decide(op, device, dtype, backend, probe(op, device, backend), native_ok)
        if len(_DECISIONS) >= _DECISIONS_MAX:
            _DECISIONS.clear()
        _DECISIONS[key] = impl
    return impl


def _decide(op: str, device: torch.device, dtype: torch.dtype, backend: str, have: Available, native_ok: bool) -> str:
    """:func:`resolve_impl`'s rules, on what ``have`` says runs here."""
    spec = OPS[op]
    triton_runs = (have.triton and "triton" not in have.disabled
                   and (device.type == "cuda" or (device.type == "cpu" and have.interpreter)))
    if (backend == "auto" and spec.extension is not None and have.extension and "extension" not in have.disabled
            and device.type == "cuda" and dtype in spec.extension_dtypes):
        return "extension"
    if backend == "triton" and not triton_runs:
        why = ("disabled by " + DISABLE_ENV if "triton" in have.disabled else
               f"needs triton (installed: {have.triton}) and CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
        raise ValueError(f"{op}: backend='triton' cannot run on {device} tensors ({why}); "
                         f"backend='torch' or 'auto' runs there")
    if backend == "triton" and spec.triton and dtype not in spec.triton_dtypes:
        raise ValueError(f"{op}: backend='triton' does not take {dtype} (its kernels compute in float32); "
                         f"backend='torch' or 'auto' computes {dtype}")
    if backend in ("auto", "triton") and triton_runs and dtype in spec.triton_dtypes:
        return "triton" if spec.triton else "torch"
    if (native_ok and spec.native is not None and have.native and "native" not in have.disabled
            and device.type == "cpu" and dtype in spec.native_dtypes):
        return "native"
    return "torch"


def grad_needed(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd will take a gradient through a call on these tensors (None allowed): grad
    mode on and one of them requires grad. The fused paths without a backward, and the choice to keep
    activations for one, ask this."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"triton"`` or ``"torch"``: whether Triton kernels run for ``backend`` on ``device``
    (the user-level view of :func:`resolve_impl`)."""
    return "triton" if resolve_impl("gated_fusion", device, torch.float32, backend) == "triton" else "torch"
