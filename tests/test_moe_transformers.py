"""The one-call transformers drop-in (m2restore_kernels.integrations.transformers) on tiny random
Mixtral-family models built by transformers itself: logits, greedy tokens and every gradient as
transformers' own eager expert loop gives them."""
from __future__ import annotations

import copy
import importlib
import inspect
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from m2restore_kernels.integrations import transformers as drop_in  # noqa: E402

COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
MODELS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                       shared_expert_intermediate_size=40, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True,
                       head_dim=8)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2)),
}


def _tiny_model(name: str):
    config_cls, model_cls, extra = MODELS[name]
    config = getattr(transformers, config_cls)(**COMMON, **extra, experts_implementation="eager")
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).float()
    # Random init at std 0.02 leaves every expert output tiny: widen it so the experts matter.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 3:
                p.normal_(0.0, 0.3)
    return model.eval()


@pytest.mark.parametrize("name,backend", [(name, "torch") for name in MODELS] + [("mixtral", "triton")])
def test_one_call_patch_matches_the_eager_expert_loop(name, backend):
    """On CPU "torch" is what "auto" runs outside the tests (the C loops and PyTorch GEMMs); "triton"
    runs the kernels in the interpreter (slow: logits and gradients only)."""
    ref = _tiny_model(name)
    ours = drop_in.apply_to_transformers_moe(copy.deepcopy(ref), backend=backend)
    assert ours.config._experts_implementation == "m2restore"
    experts = [m for m in ours.modules() if type(m).__name__.endswith("Experts")]
    assert experts and all(drop_in.expert_form(m) == "swiglu" for m in experts)
    ids = torch.randint(0, COMMON["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    ref_logits, got_logits = ref(ids).logits, ours(ids).logits
    torch.testing.assert_close(got_logits, ref_logits, rtol=1e-4, atol=1e-4)
    ref_loss = ref(ids, labels=ids).loss
    got_loss = ours(ids, labels=ids).loss
    ref_loss.backward()
    got_loss.backward()
    for (pname, p_ref), (_, p_got) in zip(ref.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(p_got.grad, p_ref.grad, rtol=1e-3, atol=1e-5, msg=lambda m: f"{pname}: {m}")
    if backend == "triton":
        return
    prompt = ids[:1, :4]
    gen = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(ours.generate(prompt, **gen), ref.generate(prompt, **gen))


def test_unsupported_expert_forms_fall_back_to_transformers_loop():
    """An activation moe_mlp does not compute (tanh-approximated GELU) runs transformers' own loop."""
    model = _tiny_model("mixtral")
    model.config.hidden_act = "gelu_pytorch_tanh"
    for m in model.modules():
        if hasattr(m, "act_fn") and type(m).__name__.endswith("Experts"):
            m.act_fn = transformers.activations.ACT2FN["gelu_pytorch_tanh"]
    ids = torch.randint(0, COMMON["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(2))
    want = model(ids).logits
    drop_in.apply_to_transformers_moe(model)
    assert all(drop_in.expert_form(m) is None for m in model.modules() if type(m).__name__.endswith("Experts"))
    torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=0)


def test_apply_refuses_what_is_not_a_transformers_model_or_backend():
    with pytest.raises(ValueError, match="model must be a transformers PreTrainedModel"):
        drop_in.apply_to_transformers_moe(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="backend must be one of"):
        drop_in.apply_to_transformers_moe(backend="cuda")


# Sizes for building one experts module of any transformers MoE from its own config class: every
# attribute of these names that the config has as an int is shrunk (the names vary by model).
_TINY = dict(hidden_size=32, d_model=32, dim=32, hidden_dim=32, n_embd=32, embed_dim=32, intermediate_size=48,
             moe_intermediate_size=48, expert_intermediate_size=48, ffn_hidden_size=48, moe_ffn_hidden_size=48,
             num_local_experts=4, num_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2)


def _experts_classes():
    """(model type, class) of every experts class of the installed transformers that
    ``@use_experts_implementation`` decorates: the modeling sources that use it, imported."""
    for source in sorted(Path(transformers.models.__file__).parent.glob("*/modeling_*.py")):
        if "@use_experts_implementation" not in source.read_text(encoding="utf-8"):
            continue
        module = importlib.import_module(f"transformers.models.{source.parent.name}.{source.stem}")
        for cls in vars(module).values():
            if (inspect.isclass(cls) and cls.__module__ == module.__name__ and hasattr(cls, "_apply_gate")
                    and hasattr(getattr(cls, "forward", None), "__wrapped__")):
                yield source.parent.name, module, cls


def _tiny_experts(module, cls):
    """An instance of ``cls`` built from one of its module's config classes (or a sub-config) with
    the sizes shrunk, or None where no config builds it."""
    extra = {"layer_idx": 0} if "layer_idx" in inspect.signature(cls.__init__).parameters else {}
    for config_cls in [v for k, v in vars(module).items() if k.endswith("Config") and inspect.isclass(v)]:
        try:
            top = config_cls()
        except Exception:
            continue
        configs = [top] + [v for v in vars(top).values() if isinstance(v, transformers.PretrainedConfig)]
        for config in configs:
            for name, value in _TINY.items():
                if isinstance(getattr(config, name, None), int) and not isinstance(getattr(config, name), bool):
                    setattr(config, name, value)
            try:
                return cls(config, **extra)
            except Exception:
                continue
    return None


def _run(experts, implementation: str, x, index, gates):
    experts.config._experts_implementation = implementation
    x = x.clone().requires_grad_()
    y = experts(x, index, gates)
    return y, torch.autograd.grad(y.square().sum(), [x, *experts.parameters()])


def _eager_and_ours(experts, n_experts: int, width: int):
    """(output, gradients) of the eager loop and of ours on 9 random tokens with K = 2 routes each
    (K = 1 where the class takes one route per row, as Ergo's), or None where the eager loop runs
    neither."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, width, generator=g)
    for k in (2, 1):
        index = torch.stack([torch.randperm(n_experts, generator=g)[:k] for _ in range(9)])
        gates = torch.rand(9, k, generator=g)
        try:
            ref = _run(experts, "eager", x, index, gates)
        except (RuntimeError, IndexError, ValueError):
            continue
        return ref, _run(experts, "m2restore", x, index, gates)
    return None


def test_every_transformers_experts_class_gives_its_eager_loop_result():
    """Every ``@use_experts_implementation`` class of the installed transformers, switched to ours:
    the output and the gradients of its eager loop, at weights large enough that the gates some
    models clamp (DeepSeek-V4's, GLM-5-Next's) do clamp. Forms moe_mlp does not compute must fall
    back, never give another function."""
    built, ours, unbuilt, wrong = [], [], [], []
    drop_in.register()
    for model_type, module, cls in _experts_classes():
        experts = _tiny_experts(module, cls)
        if experts is None:
            unbuilt.append(cls.__name__)
            continue
        torch.manual_seed(0)
        with torch.no_grad():
            for p in experts.parameters():
                p.normal_(0.0, 1.0)
        weight = experts.gate_up_proj if experts.has_gate else experts.up_proj
        n_experts, width = weight.shape[0], weight.shape[-1 if not experts.is_transposed else -2]
        results = _eager_and_ours(experts, n_experts, width)
        if results is None:
            unbuilt.append(cls.__name__)
            continue
        built.append(cls.__name__)
        if drop_in.expert_form(experts) is not None:
            ours.append(model_type)
        (y_ref, g_ref), (y_got, g_got) = results
        scale = y_ref.abs().max().item()
        if not torch.allclose(y_got, y_ref, rtol=1e-4, atol=1e-5 * scale) or not all(
                torch.allclose(a, b, rtol=1e-3, atol=1e-4 * b.abs().max().item()) for a, b in zip(g_got, g_ref)):
            wrong.append(f"{cls.__name__} (form {drop_in.expert_form(experts)})")
    assert not wrong, f"the m2restore experts disagree with the eager loop: {wrong}"
    assert {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe"} <= set(ours), ours
    assert len(built) >= 3 * len(unbuilt), f"built {len(built)}, could not build {unbuilt}"
