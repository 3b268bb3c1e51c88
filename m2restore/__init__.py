"""M2Restore: all-in-one adverse-weather image restoration (MoE + Mamba-CNN), installable.

    from m2restore import M2Restore, M2RestoreConfig
    model = M2Restore(M2RestoreConfig.paper(), prior=...)
    restored = model(images)            # (B, 3, H, W) in [0, 1]
"""
from importlib import metadata as _metadata

from .config import M2RestoreConfig
from .model import M2Restore, M2RestoreAux
from .prior import NullPrior

__all__ = ["M2Restore", "M2RestoreAux", "M2RestoreConfig", "NullPrior", "__version__"]

try:
    __version__ = _metadata.version("m2restore")  # the installed distribution's, i.e. pyproject.toml's
except _metadata.PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
