"""Degradation priors: a callable ``images (B, 3, H, W) in [0, 1] -> (d_g (B, D), P_f (B, 512))``.

``NullPrior`` carries no signal (uniform d_g, zero P_f); ``DAClipPrior`` is the frozen DA-CLIP of the
paper and needs open_clip, so it is imported only when asked for.
"""
from .null import DegradationPrior, NullPrior

__all__ = ["DegradationPrior", "NullPrior", "DAClipPrior"]


def __getattr__(name):
    if name == "DAClipPrior":
        from .daclip import DAClipPrior

        return DAClipPrior
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
