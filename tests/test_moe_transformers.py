"""The one-call transformers drop-in (m2restore_kernels.integrations.transformers) on tiny random
Mixtral-family models built by transformers itself: logits, greedy tokens and every gradient as
transformers' own eager expert loop gives them."""
from __future__ import annotations

import copy

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
