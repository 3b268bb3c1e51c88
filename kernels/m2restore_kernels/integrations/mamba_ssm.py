"""``apply_to_mamba_ssm()``: mamba-ssm's and causal-conv1d's unchanged code runs m2restore_kernels.

One call, in the manner of Liger-Kernel's ``apply_liger_kernel_to_*``, before or after the user's
own imports::

    import m2restore_kernels
    m2restore_kernels.apply_to_mamba_ssm()
    from mamba_ssm import MambaLMHeadModel      # imports without selective_scan_cuda

What it does, in three cases:

* mamba-ssm / causal-conv1d installed without their CUDA extensions (``*_SKIP_CUDA_BUILD``, or an
  extension built for another torch): a stand-in module takes the place of each extension that
  does not import (``selective_scan_cuda``, ``causal_conv1d_cuda``), so their modules import; then
  every name their loaded modules bound to one of the ops in ``DROP_INS`` (``selective_scan_fn``,
  ``mamba_inner_fn``, ``causal_conv1d_fn``, ``causal_conv1d_update``, ``causal_conv1d_varlen_states``,
  ``selective_state_update``, ``layer_norm_fn``, ``rms_norm_fn``, Mamba-2's ``mamba_chunk_scan_combined``,
  ``mamba_split_conv1d_scan_combined``, ``layernorm_fn`` and ``rmsnorm_fn``; also a name an earlier import left ``None``) is rebound to a
  dispatcher. Modules imported later bind the dispatchers, since the defining modules now hold them.
* neither installed: a meta-path finder placed after every other one serves small stand-in
  packages, ``mamba_ssm.ops.selective_scan_interface``, ``mamba_ssm.ops.triton.selective_state_update``,
  ``mamba_ssm.ops.triton.layer_norm`` (and 1.x's ``layernorm``) and ``causal_conv1d`` (+ ``causal_conv1d.causal_conv1d_interface``),
  holding our ops and references under upstream's names; client code that imports just those (MambaIR,
  VMamba) runs. An installed package is always found first.
* a working CUDA install is never shadowed: each dispatcher sends CUDA tensors to upstream's own
  function when that runs here (its CUDA extension imported for real; Triton functions always), and
  everything else (CPU tensors; CUDA tensors without the extension) to ours, whose ``backend="auto"``
  picks the C loop on CPU and Triton on CUDA. ``M2RESTORE_KERNELS_DISABLE=extension`` is the
  user's explicit choice of ours on CUDA too.

The dispatchers take upstream's parameters by name or position (the version installed, 1.1.x or
2.x); a flag ours does not implement raises a one-line ValueError naming it. The stand-in
extension modules have no functions: code that calls ``selective_scan_cuda.fwd`` itself (its own
autograd Function around the raw kernel) gets an AttributeError saying so. Mamba-2 is covered
through ``mamba_chunk_scan_combined``, ``mamba_split_conv1d_scan_combined`` and the gated norms
(``selective_scan/ssd.py``: SSD as this package's selective scan); upstream's other SSD Triton
entry points (``mamba_chunk_scan``, ``chunk_state``, ...) and Mamba-3 are not.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.util
import inspect
import sys
import types
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .._backend import disabled_impls

__all__ = ["apply_to_mamba_ssm", "DROP_INS", "layer_norm_fn", "rms_norm_fn", "RMSNorm", "mamba_ssm_reference_path"]

UPSTREAM_PACKAGES = ("mamba_ssm", "causal_conv1d")
EXTENSIONS = ("selective_scan_cuda", "causal_conv1d_cuda")


# --------------------------------------------------------------------------------------------
# Our add + LayerNorm/RMSNorm (mamba_ssm's Triton layer_norm_fn, for tensors it cannot take)
# --------------------------------------------------------------------------------------------
def layer_norm_fn(x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0,
                  rowscale=None, prenorm=False, residual_in_fp32=False, is_rms_norm=False,
                  return_dropout_mask=False):
    """mamba_ssm's ``layer_norm_fn``: h = x + residual, then LayerNorm (or RMSNorm) of h over the last
    dim, computed in float32 (float64 when x is). x, residual (..., d); weight, bias (d,).
    -> out in x's dtype, and with ``prenorm`` also h, in residual's dtype (float32 with
    ``residual_in_fp32``, else x's dtype). The parallel form (x1, weight1, bias1), rowscale, dropout
    and the dropout mask are not implemented: each raises a ValueError naming it."""
    for name, value in (("x1", x1), ("weight1", weight1), ("bias1", bias1), ("rowscale", rowscale)):
        if value is not None:
            raise ValueError(f"layer_norm_fn: {name} is not supported by m2restore_kernels; pass {name}=None")
    if dropout_p:
        raise ValueError(f"layer_norm_fn: dropout_p={dropout_p} is not supported by m2restore_kernels; "
                         "pass dropout_p=0.0 (eval mode)")
    if return_dropout_mask:
        raise ValueError("layer_norm_fn: return_dropout_mask=True is not supported by m2restore_kernels")
    compute = torch.promote_types(x.dtype, torch.float32)
    h = _cast(x, compute) if residual is None else _cast(x, compute) + _cast(residual, compute)
    w = _cast(weight, compute)
    b = None if bias is None else _cast(bias, compute)
    if is_rms_norm:
        out = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps) * w
        out = out if b is None else out + b
    else:
        out = F.layer_norm(h, h.shape[-1:], w, b, eps)
    out = _cast(out, x.dtype)
    if not prenorm:
        return out
    residual_dtype = residual.dtype if residual is not None else (torch.float32 if residual_in_fp32 else x.dtype)
    return out, _cast(h, residual_dtype)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, skipped where t already has it: a decode step makes a few of these calls per
    layer and token, and even a no-op ``.to`` costs about one small op."""
    return t if t.dtype == dtype else t.to(dtype)


def rms_norm_fn(x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0,
                rowscale=None, prenorm=False, residual_in_fp32=False, return_dropout_mask=False):
    """mamba_ssm's ``rms_norm_fn``: :func:`layer_norm_fn` with ``is_rms_norm=True``."""
    return layer_norm_fn(x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale, prenorm,
                         residual_in_fp32, True, return_dropout_mask)


class RMSNorm(torch.nn.Module):
    """mamba_ssm's ``RMSNorm`` module (weight (d,) initialised to ones, no bias), for the stand-in
    ``mamba_ssm.ops.triton.layer_norm``; forward(x, residual=None, prenorm=False, residual_in_fp32=False)."""

    def __init__(self, hidden_size, eps=1e-5, dropout_p=0.0, device=None, dtype=None):
        super().__init__()
        if dropout_p:
            raise ValueError(f"RMSNorm: dropout_p={dropout_p} is not supported by m2restore_kernels; pass 0.0")
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        return rms_norm_fn(x, self.weight, self.bias, residual=residual, eps=self.eps, prenorm=prenorm,
                           residual_in_fp32=residual_in_fp32)


# --------------------------------------------------------------------------------------------
# The table: upstream name -> where upstream defines it, our function, what it needs on CUDA
# --------------------------------------------------------------------------------------------
def _ours(name: str) -> Callable:
    """Our function for an upstream name (imported here, not at the top: the package imports us)."""
    import m2restore_kernels

    from ..selective_scan import ssd

    return {"selective_scan_fn": m2restore_kernels.selective_scan, "layer_norm_fn": layer_norm_fn,
            "rms_norm_fn": rms_norm_fn, "layernorm_fn": ssd.layernorm_fn,
            "rmsnorm_fn": ssd.rmsnorm_fn}.get(name) or getattr(m2restore_kernels, name)


# The Triton norms' module: layer_norm in mamba-ssm 2.x, layernorm in 1.x.
NORM_MODULES = ("mamba_ssm.ops.triton.layer_norm", "mamba_ssm.ops.triton.layernorm")
SSD_MODULE, GATED_NORM_MODULE = "mamba_ssm.ops.triton.ssd_combined", "mamba_ssm.ops.triton.layernorm_gated"
# name -> (upstream modules that may define it, the first that exists is taken; the CUDA extensions
# upstream's function needs, () for its Triton functions)
DROP_INS = {
    "selective_scan_fn": (("mamba_ssm.ops.selective_scan_interface",), ("selective_scan_cuda",)),
    "mamba_inner_fn": (("mamba_ssm.ops.selective_scan_interface",), ("selective_scan_cuda", "causal_conv1d_cuda")),
    "causal_conv1d_fn": (("causal_conv1d",), ("causal_conv1d_cuda",)),
    "causal_conv1d_update": (("causal_conv1d",), ("causal_conv1d_cuda",)),
    "causal_conv1d_varlen_states": (("causal_conv1d.causal_conv1d_varlen",), ()),
    "selective_state_update": (("mamba_ssm.ops.triton.selective_state_update",), ()),
    "layer_norm_fn": (NORM_MODULES, ()),
    "rms_norm_fn": (NORM_MODULES, ()),
    # Mamba-2 (2.x): the SSD scan, the fused block op (its conv is causal-conv1d's CUDA function),
    # and the gated norms of its RMSNormGated.
    "mamba_chunk_scan_combined": ((SSD_MODULE,), ()),
    "mamba_split_conv1d_scan_combined": ((SSD_MODULE,), ("causal_conv1d_cuda",)),
    "layernorm_fn": ((GATED_NORM_MODULE,), ()),
    "rmsnorm_fn": ((GATED_NORM_MODULE,), ()),
}


def _first_module(names: tuple):
    """The first of ``names`` that exists, imported; None when none does."""
    for name in names:
        try:
            if importlib.util.find_spec(name) is not None:
                return importlib.import_module(name)
        except ModuleNotFoundError:  # its parent package is missing
            continue
    return None

UPSTREAM_ATTR = "__m2restore_upstream__"  # on a dispatcher: upstream's function when it runs here, else None


def _dispatcher(name: str, upstream: Callable, upstream_runs_on_cuda: bool) -> Callable:
    """A function with upstream's signature: CUDA tensors go to ``upstream`` when it runs here (and
    the extension is not disabled), everything else to ours. Ours is looked up here, once: a decode
    step calls its dispatchers a few times per layer and token, so each does no more than it must."""
    params = list(inspect.signature(upstream).parameters)
    ours = _ours(name)
    # Ours takes upstream's parameters first, in upstream's order (then its own, such as backend):
    # positional arguments can then pass as they are; otherwise they are given ours by name.
    in_order = list(inspect.signature(ours).parameters)[:len(params)] == params

    def dispatch(*args, **kwargs):
        if len(args) > len(params):
            raise TypeError(f"{name}() takes {len(params)} positional arguments but {len(args)} were given")
        first = args[0] if args else kwargs[params[0]]
        if upstream_runs_on_cuda and first.device.type == "cuda" and "extension" not in disabled_impls():
            return upstream(*args, **kwargs)
        if in_order:
            return ours(*args, **kwargs)
        kwargs.update(zip(params, args))
        return ours(**kwargs)

    dispatch.__name__ = dispatch.__qualname__ = name
    dispatch.__doc__ = (f"m2restore_kernels' drop-in for upstream's {name}: CUDA tensors run upstream's "
                        f"{'function' if upstream_runs_on_cuda else '(missing) function: ours'}, others ours.")
    dispatch.__signature__ = inspect.signature(upstream)
    setattr(dispatch, UPSTREAM_ATTR, upstream if upstream_runs_on_cuda else None)
    return dispatch


# --------------------------------------------------------------------------------------------
# Stand-ins: extension modules that did not import, packages that are not installed
# --------------------------------------------------------------------------------------------
class _MissingExtension(types.ModuleType):
    """Imports in place of an unbuilt CUDA extension; any function taken from it raises."""

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise AttributeError(
            f"{self.__name__}.{attr}: the CUDA extension {self.__name__} is not built here; "
            "m2restore_kernels.apply_to_mamba_ssm() replaced the Python functions that call it "
            f"({', '.join(DROP_INS)}), not the raw extension")


def _extension_imports(name: str) -> bool:
    module = sys.modules.get(name)
    if isinstance(module, _MissingExtension):
        return False
    try:
        importlib.import_module(name)
        return True
    except (ImportError, OSError):  # not built, or built for another torch/CUDA
        return False


def _stand_in_packages() -> dict:
    """Module name -> its attributes, for the stand-in packages served when upstream is absent."""
    import m2restore_kernels as k
    from ..selective_scan import ssd

    scan = dict(selective_scan_fn=k.selective_scan, selective_scan_ref=k.selective_scan_ref)
    for optional in ("mamba_inner_fn", "mamba_inner_ref"):
        if hasattr(k, optional):
            scan[optional] = getattr(k, optional)
    state_update = {n: getattr(k, n) for n in ("selective_state_update", "selective_state_update_ref") if hasattr(k, n)}
    conv = {n: getattr(k, n) for n in ("causal_conv1d_fn", "causal_conv1d_update", "causal_conv1d_ref",
                                        "causal_conv1d_update_ref") if hasattr(k, n)}
    norms = dict(layer_norm_fn=layer_norm_fn, rms_norm_fn=rms_norm_fn, RMSNorm=RMSNorm)
    ssd_ops = dict(mamba_chunk_scan_combined=ssd.mamba_chunk_scan_combined,
                   mamba_split_conv1d_scan_combined=ssd.mamba_split_conv1d_scan_combined)
    gated_norms = dict(layernorm_fn=ssd.layernorm_fn, rmsnorm_fn=ssd.rmsnorm_fn, RMSNorm=ssd.RMSNormGated)
    return {
        "mamba_ssm": dict(scan), "mamba_ssm.ops": {}, "mamba_ssm.ops.triton": {},
        "mamba_ssm.ops.selective_scan_interface": scan,
        "mamba_ssm.ops.triton.selective_state_update": state_update,
        "mamba_ssm.ops.triton.layer_norm": norms, "mamba_ssm.ops.triton.layernorm": norms,  # 2.x, 1.x
        SSD_MODULE: ssd_ops, GATED_NORM_MODULE: gated_norms,
        "causal_conv1d": dict(conv), "causal_conv1d.causal_conv1d_interface": conv,
    }


class _StandInModule(types.ModuleType):
    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise AttributeError(f"{self.__name__}.{attr}: {self.__name__.split('.')[0]} is not installed; "
                             f"m2restore_kernels' stand-in {self.__name__} has only {sorted(vars(self))}")


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the stand-in packages; it sits after every other finder, so an installed package wins."""

    def __init__(self, modules: dict):
        self.modules = modules
        self.packages = {name.rsplit(".", 1)[0] for name in modules if "." in name}

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.modules:
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=fullname in self.packages)

    def create_module(self, spec):
        return _StandInModule(spec.name)

    def exec_module(self, module):
        module.__dict__.update({n: v for n, v in self.modules[module.__name__].items()
                                if not n.startswith("_")})
        if module.__name__ in self.packages:
            module.__path__ = []


_STATE: dict = {}  # what apply_to_mamba_ssm did: "finder", "extensions" (name -> imports for real), "originals"


def _rebind_loaded_modules(dispatchers: dict, originals: dict) -> list:
    """Rebinds, in every loaded module of the upstream packages, each name bound to upstream's
    function (or left None by a failed import) to its dispatcher. -> the "module.name"s rebound."""
    rebound = []
    for module_name, module in list(sys.modules.items()):
        if module is None or module_name.split(".")[0] not in UPSTREAM_PACKAGES:
            continue
        for name, dispatcher in dispatchers.items():
            value = module.__dict__.get(name, dispatcher)
            if value is not dispatcher and (value is None or value is originals[name]):
                setattr(module, name, dispatcher)
                rebound.append(f"{module_name}.{name}")
    return rebound


def apply_to_mamba_ssm() -> dict:
    """Make mamba-ssm's and causal-conv1d's code run m2restore_kernels (see the module docstring).
    Idempotent; call it before or after importing them. -> a summary: ``"extensions"`` (each CUDA
    extension: whether the real one imports), ``"stand_in_packages"`` (the packages served by the
    stand-ins, those not installed), ``"rebound"`` ("module.name" for each name now dispatching)."""
    installed = {p: importlib.util.find_spec(p) is not None for p in UPSTREAM_PACKAGES}
    if "finder" not in _STATE:
        modules = {name: attrs for name, attrs in _stand_in_packages().items()
                   if not installed[name.split(".")[0]]}
        _STATE["finder"] = _StandInFinder(modules)
        sys.meta_path.append(_STATE["finder"])
        _STATE["extensions"] = {}
    extensions = _STATE["extensions"]
    if any(installed.values()):
        for ext in EXTENSIONS:
            if ext not in extensions:
                extensions[ext] = _extension_imports(ext)
                if not extensions[ext]:
                    sys.modules[ext] = _MissingExtension(ext)
    originals = _STATE.setdefault("originals", {})
    dispatchers = {}
    for name, (module_names, needs) in DROP_INS.items():
        module = _first_module(module_names) if installed[module_names[0].split(".")[0]] else None
        current = getattr(module, name, None)
        if current is None:  # not in this version
            continue
        if getattr(current, UPSTREAM_ATTR, False) is False:  # not one of ours yet
            originals[name] = current
            dispatchers[name] = _dispatcher(name, current, all(extensions.get(e, True) for e in needs))
        else:
            dispatchers[name] = current
    rebound = _rebind_loaded_modules(dispatchers, originals)
    return {"extensions": dict(extensions), "stand_in_packages": sorted(p for p, ok in installed.items() if not ok),
            "rebound": rebound}


@contextlib.contextmanager
def mamba_ssm_reference_path(model: Optional[torch.nn.Module] = None):
    """Within the block, mamba-ssm runs its own PyTorch reference path, as a machine without any of
    its kernels would: ``selective_scan_ref`` for the scan, causal-conv1d's ``causal_conv1d_ref``
    inside ``mamba_inner_ref``, ``Mamba`` with ``use_fast_path=False`` and its PyTorch conv and
    decode step, and the norms through ``layer_norm_ref`` / ``rms_norm_ref``. For comparisons
    (tests, benchmarks) against the drop-ins; needs mamba-ssm and causal-conv1d installed (and
    :func:`apply_to_mamba_ssm` called, when their extensions are missing). ``model``: its ``Mamba``
    layers get ``use_fast_path=False`` for the block."""
    ssi = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    simple = importlib.import_module("mamba_ssm.modules.mamba_simple")
    ln = _first_module(NORM_MODULES)
    conv_ref = importlib.import_module("causal_conv1d.causal_conv1d_interface").causal_conv1d_ref

    def norm_ref(x, weight, bias, residual=None, eps=1e-6, prenorm=False, residual_in_fp32=False,
                 is_rms_norm=False, **unused):  # unused: the flags the models leave at their defaults
        ref = ln.rms_norm_ref if is_rms_norm else ln.layer_norm_ref
        out = ref(x, weight, bias, residual=residual, eps=eps, prenorm=prenorm, upcast=True)
        if not prenorm:
            return out
        return out[0].to(x.dtype), out[1].float() if residual_in_fp32 else out[1]

    def rms_ref(x, weight, bias, **kwargs):
        return norm_ref(x, weight, bias, is_rms_norm=True, **kwargs)

    patches = [(ssi, "selective_scan_fn", ssi.selective_scan_ref), (ssi, "causal_conv1d_fn", conv_ref),
               (simple, "selective_scan_fn", ssi.selective_scan_ref), (simple, "causal_conv1d_fn", None),
               (simple, "causal_conv1d_update", None), (simple, "selective_state_update", None),
               (ln, "rms_norm_fn", rms_ref)]
    for name in ("mamba_ssm.modules.block", "mamba_ssm.models.mixer_seq_simple"):
        if name in sys.modules:
            patches.append((sys.modules[name], "layer_norm_fn", norm_ref))
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    mambas = [m for m in (model.modules() if model is not None else ()) if isinstance(m, simple.Mamba)]
    fast = [m.use_fast_path for m in mambas]
    try:
        for module, name, value in patches:
            setattr(module, name, value)
        for m in mambas:
            m.use_fast_path = False
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
        for m, flag in zip(mambas, fast):
            m.use_fast_path = flag
