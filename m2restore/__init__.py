"""M2Restore: all-in-one adverse-weather image restoration (MoE + Mamba-CNN), installable.

    from m2restore import M2Restore
    model = M2Restore.from_pretrained("demo").eval()      # the shipped demo weights
    restored = model(images).clamp(0, 1)                  # images (B, 3, H, W) in [0, 1]

The names below load on first use, so ``import m2restore`` (and ``m2restore --help``) does not
import torch.
"""
from __future__ import annotations

import importlib
from importlib import metadata as _metadata

# Public name -> the submodule that defines it.
_EXPORTS = {
    "M2Restore": ".model",
    "M2RestoreAux": ".model",
    "M2RestoreConfig": ".config",
    "NullPrior": ".prior",
}

__all__ = [*_EXPORTS, "__version__"]

try:
    __version__ = _metadata.version("m2restore")  # the installed distribution's, i.e. pyproject.toml's
except _metadata.PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
