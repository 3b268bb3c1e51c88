"""The blocks of M2Restore, one file per block family (see ``m2restore/model.py`` for the wiring)."""
from .aflb import AFLB
from .dder import DDER, balance_loss
from .mcdb import DGF, MCDB, MambaMixer
from .tpgs import TaskPrompt
from .transformer import GDFN, MDTA, Downsample, LayerNorm2d, TransformerBlock, Upsample

__all__ = [
    "AFLB", "DDER", "balance_loss", "DGF", "MCDB", "MambaMixer", "TaskPrompt",
    "GDFN", "MDTA", "Downsample", "LayerNorm2d", "TransformerBlock", "Upsample",
]
