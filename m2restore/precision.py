"""The precision the network runs at, by name, and the choice ``--dtype auto`` makes.

:data:`PRECISIONS` maps a name to the autocast dtype (``None`` for fp32: no autocast).
:func:`resolve_precision` turns ``"auto"`` into ``"bf16"`` where bf16 is native and pays, and into
``"fp32"`` everywhere else:

- a CUDA GPU with bf16 tensor cores (compute capability 8.0 or newer): bf16;
- an x86 CPU with AMX-BF16, or with AVX512-BF16 whose AVX-512 kernels PyTorch uses: bf16 for a
  network at least :data:`CPU_BF16_MIN_DIM` channels wide (``config.dim``), fp32 for a narrower one.
  The bf16 dot products only win over the conversions autocast adds around every op when the
  matmuls and convolutions are wide: on an AVX512-BF16 AMD EPYC ``paper()`` (dim 48) at 224² ran
  1.4× faster in bf16, the shipped ``tiny()`` demo (dim 8) at 512² not at all (bench/RESULTS.md);
- any other CPU (AVX2, ARM, ...): fp32, since bf16 autocast converts every operand in software
  there and runs 2.5–10× slower (bench/RESULTS.md, AVX2 EPYC).

:data:`NATIVE_BF16_ENV` (``M2RESTORE_NATIVE_BF16=1`` or ``0``) overrides what the CPU is found to
have: for a virtual machine that hides its CPU flags, or to run the tests as on the other kind of CPU.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterable

import torch

from .options import AUTO, CPU_BF16_MIN_DIM, PRECISION_CHOICES, PRECISION_NAMES

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # fp32: None, no autocast
PRECISIONS: dict[str, torch.dtype | None] = {name: _AUTOCAST_DTYPES.get(name) for name in PRECISION_NAMES}
#: /proc/cpuinfo flags of x86 CPUs with native bf16 arithmetic.
_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
#: ``1``: treat the CPU as computing bf16 natively, ``0``: as not; unset: read its flags.
NATIVE_BF16_ENV = "M2RESTORE_NATIVE_BF16"


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
    ``cuda_capability`` (``torch.cuda.get_device_capability``) are read from the machine when None;
    on a CPU whose flags are read, ``$M2RESTORE_NATIVE_BF16`` (``1`` or ``0``) decides instead when set.
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
    if flags is None:
        forced = _forced_native_bf16()
        if forced is not None:
            return forced, f"{NATIVE_BF16_ENV}={int(forced)} (PyTorch CPU capability {capability})"
    flags = frozenset(cpu_flags() if flags is None else flags)
    if "amx_bf16" in flags:
        return True, f"CPU has AMX-BF16 (PyTorch CPU capability {capability})"
    if "avx512_bf16" in flags and capability.upper().startswith("AVX512"):
        return True, f"CPU has AVX512-BF16 (PyTorch CPU capability {capability})"
    have = [f for f in _BF16_FLAGS if f in flags]
    detail = f"{', '.join(have)} unused at capability {capability}" if have else "no AMX-BF16 or AVX512-BF16"
    return False, f"CPU without native bf16 ({detail}; PyTorch CPU capability {capability})"


def _forced_native_bf16() -> bool | None:
    """``$M2RESTORE_NATIVE_BF16`` as a bool, None when unset or empty."""
    value = os.environ.get(NATIVE_BF16_ENV, "").strip()
    if not value:
        return None
    if value not in ("0", "1"):
        raise ValueError(f"{NATIVE_BF16_ENV}={value!r}: set it to 1 (the CPU computes bf16 natively), "
                         "0 (it does not), or unset it to read the CPU's flags")
    return value == "1"


def resolve_precision(name: str, device: torch.device | str, config=None, **machine) -> tuple[str, str]:
    """(a key of :data:`PRECISIONS`, why) for ``name`` (one of :data:`PRECISION_CHOICES`) on ``device``
    running a network of ``config`` (an ``M2RestoreConfig``; None: not known).

    ``auto`` is ``bf16`` where :func:`native_bf16` says so — on a CPU only for a ``config`` at least
    :data:`CPU_BF16_MIN_DIM` wide, or when no ``config`` is given — else ``fp32``; ``machine`` passes
    its keyword arguments on (for tests). An explicit name is returned as it is.
    """
    if name in PRECISIONS:
        return name, "asked for"
    if name != AUTO:
        raise ValueError(f"precision must be one of {PRECISION_CHOICES}, got {name!r}")
    native, reason = native_bf16(device, **machine)
    if native and torch.device(device).type == "cpu" and config is not None and config.dim < CPU_BF16_MIN_DIM:
        return "fp32", (f"{reason}, but the network is {config.dim} channels wide, narrower than the "
                        f"{CPU_BF16_MIN_DIM} from which bf16 pays on a CPU")
    return ("bf16" if native else "fp32"), reason
