"""The precision the network runs at, by name, and the choice ``--dtype auto`` makes.

:data:`PRECISIONS` maps a name to the autocast dtype (``None`` for fp32: no autocast).
:func:`resolve_precision` turns ``"auto"`` into ``"bf16"`` where bf16 is native — a CUDA GPU that
computes in bf16 (compute capability 8.0 or newer), an x86 CPU with AMX-BF16, or one with
AVX512-BF16 whose AVX-512 kernels PyTorch uses — and into ``"fp32"`` everywhere else: on a CPU
without those instructions bf16 autocast converts every operand in software and runs slower
than fp32 (bench/RESULTS.md has the measurement on an AVX2 CPU).
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch

from .options import AUTO, PRECISION_CHOICES, PRECISION_NAMES

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # fp32: None, no autocast
PRECISIONS: dict[str, torch.dtype | None] = {name: _AUTOCAST_DTYPES.get(name) for name in PRECISION_NAMES}
#: /proc/cpuinfo flags of x86 CPUs with native bf16 arithmetic.
_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags the kernel reports (Linux); empty where there is no such file."""
    with contextlib.suppress(OSError):
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_bf16(device: torch.device | str, capability: str | None = None, flags: Iterable[str] | None = None,
                cuda_capability: tuple[int, int] | None = None) -> tuple[bool, str]:
    """(whether ``device`` computes natively in bf16, the reason in words).

    ``capability`` (``torch.backends.cpu.get_cpu_capability()``), ``flags`` (:func:`cpu_flags`) and
    ``cuda_capability`` (``torch.cuda.get_device_capability``) are read from the machine when None.
    """
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = cuda_capability or torch.cuda.get_device_capability(device)
        if major >= 8:
            return True, f"CUDA compute capability {major}.{minor} has bf16 tensor cores"
        return False, f"CUDA compute capability {major}.{minor} has no bf16 tensor cores"
    if device.type != "cpu":
        return False, f"no bf16 fast path known for device type {device.type!r}"
    capability = capability if capability is not None else torch.backends.cpu.get_cpu_capability()
    flags = frozenset(cpu_flags() if flags is None else flags)
    if "amx_bf16" in flags:
        return True, f"CPU has AMX-BF16 (PyTorch CPU capability {capability})"
    if "avx512_bf16" in flags and capability.upper().startswith("AVX512"):
        return True, f"CPU has AVX512-BF16 (PyTorch CPU capability {capability})"
    have = [f for f in _BF16_FLAGS if f in flags]
    detail = f"{', '.join(have)} unused at capability {capability}" if have else "no AMX-BF16 or AVX512-BF16"
    return False, f"CPU without native bf16 ({detail}; PyTorch CPU capability {capability})"


def resolve_precision(name: str, device: torch.device | str, **machine) -> tuple[str, str]:
    """(a key of :data:`PRECISIONS`, why) for ``name`` (one of :data:`PRECISION_CHOICES`) on ``device``.

    ``auto`` is ``bf16`` where :func:`native_bf16` says so, else ``fp32``; ``machine`` passes its
    keyword arguments on (for tests). An explicit name is returned as it is.
    """
    if name in PRECISIONS:
        return name, "asked for"
    if name != AUTO:
        raise ValueError(f"precision must be one of {PRECISION_CHOICES}, got {name!r}")
    native, reason = native_bf16(device, **machine)
    return ("bf16" if native else "fp32"), reason
