"""Reading a state dict from a file someone else saved, safely (``torch.load(weights_only=True)``)."""
from __future__ import annotations

import os
from typing import Mapping

import torch


def read_state_dict(path: str | os.PathLike, hint: str = "") -> dict[str, torch.Tensor]:
    """The state dict in ``path``: a bare one, or one under ``"state_dict"`` (Lightning's and most
    training scripts' layout), with its keys as saved. Raises ``OSError`` when the file cannot be
    opened and ``ValueError`` (one line, ending in ``hint``) when it is not a state dict that loads
    without unpickling code."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as err:  # pickle, zip and weights_only errors all mean "cannot read it safely"
        detail = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"{path} is not a PyTorch checkpoint that loads with torch.load(weights_only=True) "
                         f"({type(err).__name__}: {detail}){hint}") from err
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if (not isinstance(obj, Mapping) or not obj
            or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(obj)
