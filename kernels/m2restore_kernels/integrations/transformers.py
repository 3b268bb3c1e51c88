"""Hugging Face ``transformers`` (5.x) sparse-MoE models on :func:`m2restore_kernels.moe_mlp`.

transformers 5 keeps every expert of a sparse MoE block (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and
the other ``@use_experts_implementation`` classes) as fused 3-D parameters, ``gate_up_proj``
(N, 2*I, H) with the gate first and ``down_proj`` (N, H, I) in nn.Linear's (out, in) layout, and
picks the experts' forward from a registry by ``config._experts_implementation``. One call
registers ours there and switches a model to it::

    from m2restore_kernels.integrations.transformers import apply_to_transformers_moe
    apply_to_transformers_moe(model)          # or: register, then from_pretrained(..., experts_implementation="m2restore")

The model's own router still computes the top-K weights; our op then runs the K chosen experts
per token (a sort by expert, the GEMMs on the parameters where they lie, no per-expert Python loop
over masks) and its backward. Expert forms the op does not express (an activation other than
exact GELU, SiLU or ReLU; a gate of the class's own, such as DeepSeek-V4's clamped SwiGLU;
interleaved gate/up columns; a post-expert norm; expert parallelism) run transformers' own eager
loop, so switching is always safe.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._backend import BACKENDS
from ..moe import moe_mlp

IMPLEMENTATION = "m2restore"
BACKEND_ATTRIBUTE = "m2restore_backend"  # set on experts modules by apply_to_transformers_moe(backend=)
# transformers' activation classes (by name: this module must import without transformers) and
# nn's, as moe_mlp names them. transformers' GELUActivation is the exact (erf) GELU.
_ACTIVATIONS = {"GELUActivation": "gelu", "SiLUActivation": "silu", "SiLU": "silu", "ReLU": "relu", "GELU": "gelu"}


def _own_gate(experts: nn.Module) -> bool:
    """Whether the class replaces transformers' ``_apply_gate`` (act(gate) * up): DeepSeek-V4,
    GLM-5-Next, Step-3.7 and gpt-oss clamp gate and up to a limit first, and others change it in
    other ways; moe_mlp computes only the plain form."""
    apply_gate = getattr(type(experts), "_apply_gate", None)
    return apply_gate is not None and apply_gate.__name__ != "_default_apply_gate"


def expert_form(experts: nn.Module) -> Optional[str]:
    """moe_mlp's ``activation`` for a transformers experts module, or None where moe_mlp cannot run it."""
    act = getattr(experts, "act_fn", None)
    name = _ACTIVATIONS.get(type(act).__name__)
    if isinstance(act, nn.GELU) and act.approximate != "none":
        name = None
    if (name is None or getattr(experts, "has_post_expert_norm", False) or getattr(experts, "_is_expert_parallel", False)
            or not getattr(experts, "is_concatenated", True) or _own_gate(experts)):
        return None
    if getattr(experts, "has_gate", True):
        return {"silu": "swiglu", "gelu": "geglu"}.get(name)
    return name


def experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts forward signature: hidden_states (T, H), top_k_index (T, K) int64,
    top_k_weights (T, K) -> (T, H) in hidden_states' dtype."""
    activation = expert_form(self)
    if activation is None:
        return type(self).forward.__wrapped__(self, hidden_states, top_k_index, top_k_weights)
    gated = activation in ("swiglu", "geglu")
    w1 = self.gate_up_proj if gated else self.up_proj
    b1 = None
    if self.has_bias:
        b1 = self.gate_up_proj_bias if gated else self.up_proj_bias
    b2 = self.down_proj_bias if self.has_bias else None
    # Not transposed: nn.Linear's (out, in); transposed: (in, out), our stacked layout.
    layout = "stacked" if getattr(self, "is_transposed", False) else "linear"
    y = moe_mlp(hidden_states, top_k_weights, top_k_index, w1, b1, self.down_proj, b2,
                backend=getattr(self, BACKEND_ATTRIBUTE, "auto"), activation=activation, layout=layout,
                check_indices=False)
    return y.to(hidden_states.dtype)


def register() -> str:
    """Register ``"m2restore"`` in transformers' experts registry (idempotent); returns the name."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, experts_forward)
    return IMPLEMENTATION


def apply_to_transformers_moe(model: Optional[nn.Module] = None, backend: str = "auto") -> Optional[nn.Module]:
    """Register our experts implementation and, given a transformers ``PreTrainedModel``, switch it
    (and its sub-models) to it, its experts running ``moe_mlp(..., backend=backend)``; returns the
    model. Without a model, pass ``experts_implementation="m2restore"`` to ``from_pretrained`` /
    ``from_config`` afterwards (backend "auto")."""
    if backend not in BACKENDS:
        raise ValueError(f"apply_to_transformers_moe: backend must be one of {BACKENDS}, got {backend!r}")
    name = register()
    if model is not None:
        if not hasattr(model, "set_experts_implementation"):
            raise ValueError(f"apply_to_transformers_moe: model must be a transformers PreTrainedModel with "
                             f"set_experts_implementation (transformers >= 5), got {type(model).__name__}")
        model.set_experts_implementation(name)
        for module in model.modules():
            if hasattr(module, "has_gate") and hasattr(module, "down_proj"):  # @use_experts_implementation classes
                setattr(module, BACKEND_ATTRIBUTE, backend)
    return model
