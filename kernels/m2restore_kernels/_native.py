"""C kernels for the CPU, compiled on first use and loaded with ctypes.

Triton has no CPU backend, so the few loops that PyTorch runs poorly on a CPU (the selective
scan's recurrence, the MoE's routing and log-sum-exp combination) are plain C files under
``csrc/``; each op's ``native_impl.py`` declares its library's C signatures and limits. The first
call compiles one with the system C
compiler (``$CC``, else ``cc``; the same compiler Triton itself needs on a GPU machine) into a
cache folder (``$M2RESTORE_KERNELS_CACHE``, else ``~/.cache/m2restore_kernels``), keyed by the
source, the flags and this processor, so later processes load it at once. Where no compiler works,
or "native" is disabled (``_backend.disabled_impls``: ``M2RESTORE_KERNELS_DISABLE=native`` or
``M2RESTORE_NATIVE=0``), :func:`load` returns None and the resolver picks the PyTorch paths.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import struct
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch

from ._backend import disabled_impls

CSRC = Path(__file__).with_name("csrc")
BUILD_TIMEOUT_S = 120  # a build takes seconds; a hung compiler must not hang the first call forever
# -march=native: built where it runs. -ffast-math lets the compiler vectorise expf/logf (glibc's
# libmvec); -fno-associative-math keeps it from "simplifying" compensated expressions such as
# ((1 + e) - 1) - e, while `omp simd reduction` still vectorises the sums it is asked to.
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fno-associative-math", "-fopenmp", "-fPIC")
# Linked in a second step without -ffast-math: linked with it, GCC adds crtfastmath.o, whose
# constructor switches the whole process to flush subnormals to zero the moment the library loads.
LINK_FLAGS = ("-shared", "-fopenmp")


def _cpu_signature() -> str:
    """The processor's model and feature flags: a library built with -march=native runs only there."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("M2RESTORE_KERNELS_CACHE") or Path.home() / ".cache" / "m2restore_kernels"
    return Path(root)


@functools.lru_cache(maxsize=None)
def load(name: str) -> Optional[ctypes.CDLL]:
    """``csrc/<name>.c`` as a loaded shared library, or None (disabled, no compiler, build failed)."""
    if "native" in disabled_impls():
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    source = CSRC / f"{name}.c"
    key = hashlib.sha256(b"\0".join([source.read_bytes(), " ".join(FLAGS + LINK_FLAGS).encode(), compiler.encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    target = _cache_dir() / f"{name}-{key}.so"
    if not target.exists():
        tmp = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            # Build beside the target, then rename: concurrent first calls never load half a file.
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
            run = dict(check=True, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
            subprocess.run([compiler, *FLAGS, "-c", str(source), "-o", tmp + ".o"], **run)
            subprocess.run([compiler, *LINK_FLAGS, tmp + ".o", "-o", tmp, "-lm"], **run)
            os.replace(tmp, target)
        except (OSError, subprocess.SubprocessError) as exc:
            detail = str(getattr(exc, "stderr", None) or exc).strip()[-500:]  # the compiler's last words
            warnings.warn(f"m2restore_kernels: could not build {source.name} ({detail}); "
                          f"using the PyTorch path instead", RuntimeWarning, stacklevel=2)
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
            return None
        finally:
            if tmp is not None and os.path.exists(tmp + ".o"):
                os.unlink(tmp + ".o")
    return ctypes.CDLL(str(target))


# A decode step of a small model is a few thousand multiply-adds: below this many elements a second
# thread costs more to wake than it saves.
PARALLEL_MIN_ELEMENTS = 1 << 16


def threads_for(elements: int) -> int:
    """OpenMP threads for a loop over ``elements`` values: one for small ones (PARALLEL_MIN_ELEMENTS)."""
    return 1 if elements < PARALLEL_MIN_ELEMENTS else torch.get_num_threads()


# The ctypes argument type of int64s' value (read by C as a pointer to the struct).
INT64S = ctypes.c_char_p


def int64s(*values) -> bytes:
    """A C struct made of int64 fields only, from its field values in order (a decode step's
    shapes, strides and flags), packed into bytes: far cheaper to build per call than a ctypes array
    or Structure. Passed as an ``INT64S`` argument; C reads it, never writes it."""
    return struct.pack(f"{len(values)}q", *values)


def ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    """A tensor's data address for a ``c_void_p`` argument (None: NULL). The caller keeps ``t`` alive
    (bound to a name) until the call returns: a temporary copy would be freed before C reads it."""
    return None if t is None else t.data_ptr()
