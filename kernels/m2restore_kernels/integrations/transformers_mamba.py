"""Hugging Face ``transformers`` (5.x) Mamba-family models on m2restore_kernels, on the CPU too.

transformers 5 takes the SSM ops of its Mamba, Mamba-2, FalconMamba, Jamba, Bamba, Zamba2,
NemotronH, GraniteMoeHybrid, ... layers from mamba-ssm and causal-conv1d (each op decorated with
``use_kernel_func_from_hub_with_fallback``), and only for CUDA tensors: on a CPU, or without the
packages, it runs its reference PyTorch code (sequential scans; "correct but much slower", it
warns). One call makes those ops run ours::

    import m2restore_kernels
    from m2restore_kernels.integrations.transformers_mamba import apply_to_transformers_mamba
    apply_to_transformers_mamba()             # before or after importing the models

It calls :func:`~m2restore_kernels.apply_to_mamba_ssm` (so mamba-ssm's and causal-conv1d's names
are our dispatchers, or our stand-ins where they are not installed), adds the CPU to the devices
transformers lets those two packages run on, and decorates again the ops of every transformers
model module already imported (the decorator fixed its choice at import). CUDA tensors keep what
they ran before: upstream's kernels where they import, else ours.
"""
from __future__ import annotations

import inspect
import sys
from typing import Optional

import torch

from .mamba_ssm import UPSTREAM_PACKAGES, apply_to_mamba_ssm

__all__ = ["apply_to_transformers_mamba"]

DEVICES = ("cuda", "cpu")  # where the dispatchers run: CUDA (upstream's or our Triton) and the CPU (our C loops)


def _decorated(value) -> Optional[tuple]:
    """(the function ``use_kernel_func_from_hub_with_fallback`` made for a mamba-ssm or causal-conv1d
    op, the names its closure holds) from a module attribute (with the ``kernels`` package
    installed, a module whose forward calls it), else None."""
    if isinstance(value, torch.nn.Module):  # kernels' Func: its class's forward closes over the function
        cells = getattr(type(value).forward, "__closure__", None) or ()
        value = next((c.cell_contents for c in cells if callable(c.cell_contents)
                      and hasattr(c.cell_contents, "__wrapped__")), None)
    if not callable(value) or not hasattr(value, "__wrapped__") or getattr(value, "__closure__", None) is None:
        return None
    names = inspect.getclosurevars(value).nonlocals
    if names.get("package") in UPSTREAM_PACKAGES and isinstance(names.get("func_name"), str):
        return value, names
    return None


def apply_to_transformers_mamba() -> list:
    """Run transformers' Mamba-family SSM ops on m2restore_kernels (see the module docstring);
    idempotent. -> "module.name" of each op decorated again (those imported before the call)."""
    try:
        from transformers.integrations import hub_kernels
    except ImportError:
        hub_kernels = None
    if not hasattr(hub_kernels, "_PACKAGE_SUPPORTED_DEVICES"):
        raise ImportError("apply_to_transformers_mamba needs transformers 5 (its hub_kernels op registry); "
                          "pip install 'transformers>=5'")
    apply_to_mamba_ssm()
    for package in UPSTREAM_PACKAGES:
        devices = hub_kernels._PACKAGE_SUPPORTED_DEVICES.get(package, ())
        hub_kernels._PACKAGE_SUPPORTED_DEVICES[package] = tuple(dict.fromkeys((*devices, *DEVICES)))
    redone = []
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith("transformers.models."):
            continue
        for attr, value in list(vars(module).items()):
            found = _decorated(value)
            if found is None:
                continue
            fn, names = found
            if "cpu" in (names.get("supported_devices") or ()) and names.get("is_new_implementation"):
                continue  # decorated after the devices changed: ours already
            decorate = hub_kernels.use_kernel_func_from_hub_with_fallback(names["func_name"], names["package"])
            setattr(module, attr, decorate(fn.__wrapped__))
            redone.append(f"{module_name}.{attr}")
    return redone
