"""M2Restore: all-in-one adverse-weather image restoration (MoE + Mamba-CNN), installable.

    from m2restore import M2Restore, M2RestoreConfig
    model = M2Restore(M2RestoreConfig.paper(), prior=...)
    restored = model(images)            # (B, 3, H, W) in [0, 1]
"""
from .config import M2RestoreConfig
from .model import M2Restore, M2RestoreAux
from .prior import NullPrior

__all__ = ["M2Restore", "M2RestoreAux", "M2RestoreConfig", "NullPrior"]
