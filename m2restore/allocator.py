"""Keep freed CPU memory in the process, so large tensors reuse pages that are already mapped.

PyTorch's CPU allocator does not cache: every tensor is a fresh ``malloc``. glibc serves blocks
above its mmap threshold (128 KiB, raised on the fly up to 32 MiB) straight from the kernel and
hands them back on ``free``, so every large activation (a 96-channel 224x224 float32 feature map
is 19 MB) is page-faulted in again, one 4 KiB page at a time (bench/RESULTS.md has what that
costs the full model on a CPU).

:func:`retain_freed_memory` raises the mmap and trim thresholds (``mallopt``) so freed blocks stay
in the heap for the next allocation, as a caching allocator would. The price is memory: freed
blocks are not returned to the system between calls, and PyTorch's 64-byte-aligned requests do
not fit exactly into the block just freed, so the heap grows for a few steps before it reuses
them. It changes the whole process, so the library never calls it by itself: the ``m2restore``
command and the benchmark suite do, and programs that import the model can.
``M2RESTORE_MALLOC=system`` turns it off. A no-op where the C library is not glibc (macOS, musl,
Windows).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
_THRESHOLD = 1 << 30  # blocks above 1 GiB still go straight to the kernel
_TRIM = (1 << 31) - 1  # mallopt takes a C int: keep up to 2 GiB of free heap top


def retain_freed_memory() -> bool:
    """Make glibc keep freed blocks up to 1 GiB for reuse. Returns True if it took effect."""
    if os.environ.get("M2RESTORE_MALLOC", "") == "system":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM))
    except (OSError, AttributeError):
        return False
