"""``apply_to_transformers_mamba()``: transformers' own Mamba and Mamba-2 language models, unchanged,
run their SSM ops on our kernels on the CPU, and give what transformers' reference PyTorch code
gives: logits, every gradient (training mode: the fused block ops), greedy tokens (the cached
decode steps) and a prompt fed in two chunks (the second from the cache's state). Each model runs in a fresh process: the call changes process-wide state, and the
reference must run before it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("transformers")

SCRIPT = textwrap.dedent("""
    import json, sys, torch, transformers
    from torch.profiler import profile

    name = sys.argv[1]
    common = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if name == "mamba":
        config = transformers.MambaConfig(state_size=8, expand=2, conv_kernel=4, **common)
        model_cls = transformers.MambaForCausalLM
    else:
        config = transformers.Mamba2Config(state_size=8, head_dim=8, num_heads=8, n_groups=2, expand=2, chunk_size=8,
                                           **common)
        model_cls = transformers.Mamba2ForCausalLM
    torch.manual_seed(0)
    model = model_cls(config).float()
    with torch.no_grad():  # widen the small init so every part of the layers matters
        for n, p in model.named_parameters():
            if "dt_bias" in n or "norm" in n:
                p.normal_(0.5, 0.3)
    ids = torch.randint(3, 61, (2, 13), generator=torch.Generator().manual_seed(1))

    def run():
        model.train()
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.eval()
        with torch.no_grad():
            logits = model(ids).logits
            tokens = model.generate(ids[:, :5], max_new_tokens=6, do_sample=False)
            # A prompt in two chunks: the second starts from the cache's state (Mamba-2's initial_states).
            resumed = model(ids[:, 8:], cache=model(ids[:, :8], use_cache=True).cache, use_cache=True).logits
        return logits, grads, tokens, resumed

    ref_logits, ref_grads, ref_tokens, ref_resumed = run()
    from m2restore_kernels.integrations.transformers_mamba import apply_to_transformers_mamba
    redone = apply_to_transformers_mamba()
    with profile() as prof:
        logits, grads, tokens, resumed = run()
    ops = sorted({e.name for e in prof.events() if e.name.startswith("m2restore_kernels::")})
    worst_grad = max(((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item() for n, g in ref_grads.items())
    print(json.dumps(dict(redone=redone, ops=ops, logits=(logits - ref_logits).abs().max().item(),
                          resumed=(resumed - ref_resumed).abs().max().item(),
                          grad=worst_grad, tokens=torch.equal(tokens, ref_tokens))))
""")


def _last_json_line(script: str, *args: str) -> dict:
    """Runs ``script`` in a fresh interpreter on the C loops (as a user's CPU process) -> the JSON of
    its last line."""
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "M2RESTORE_KERNELS_DISABLE": "triton"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["mamba", "mamba2"])
def test_transformers_mamba_models_run_our_kernels_and_agree(name):
    result = _last_json_line(SCRIPT, name)
    assert result["redone"], "no transformers op was switched"
    assert "m2restore_kernels::selective_scan" in result["ops"], result["ops"]
    assert result["logits"] < 1e-4 and result["resumed"] < 1e-4 and result["grad"] < 1e-3 and result["tokens"], result


HYBRIDS = textwrap.dedent("""
    import json, torch, transformers
    from torch.profiler import profile

    # Other transformers models whose SSM layers take the same ops, at toy sizes with one attention
    # layer where they are hybrids: FalconMamba (mamba_inner_fn with RMS-normalised B, C and dt),
    # Jamba (Mamba-1 beside attention and MoE), NemotronH, Bamba, GraniteMoeHybrid, FalconH1 and
    # Zamba2 (Mamba-2 layers).
    common = dict(vocab_size=61, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=2, max_position_embeddings=64)
    ssd = dict(mamba_n_heads=4, mamba_d_head=32, mamba_n_groups=2, mamba_d_state=8, mamba_chunk_size=8)
    configs = {
        "FalconMamba": dict(state_size=8, expand=2, conv_kernel=4, time_step_rank=8),
        "Jamba": dict(mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, num_experts=4, num_experts_per_tok=2,
                      expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1),
        "NemotronH": dict(ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=32, n_groups=2, chunk_size=8,
                          layers_block_type=["mamba", "attention"]),
        "Bamba": dict(attn_layer_indices=[1], **ssd),
        "GraniteMoeHybrid": dict(layer_types=["mamba", "attention"], num_local_experts=4, num_experts_per_tok=2, **ssd),
        "FalconH1": dict(mamba_d_ssm=128, head_dim=16, **ssd),
        "Zamba2": dict(layers_block_type=["mamba", "hybrid"], hybrid_layer_ids=[1], mamba_d_state=8, n_mamba_heads=4,
                       mamba_headdim=32, mamba_ngroups=2, chunk_size=8),
    }
    models = {}
    for name, extra in configs.items():
        torch.manual_seed(0)
        config = getattr(transformers, name + "Config")(**common, **extra)
        model = models[name] = getattr(transformers, name + "ForCausalLM")(config).float().eval()
        with torch.no_grad():  # some inits leave the SSM branch silent (zero projections): wake every weight
            for p in model.parameters():
                p.normal_(1.0 if p.dim() == 1 else 0.0, 0.2)
    ids = torch.randint(3, 61, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = {name: model(ids).logits for name, model in models.items()}
    from m2restore_kernels.integrations.transformers_mamba import apply_to_transformers_mamba
    apply_to_transformers_mamba()
    result = {}
    for name, model in models.items():
        with torch.no_grad(), profile() as prof:
            got = model(ids).logits
        ran_ours = any(e.name == "m2restore_kernels::selective_scan" for e in prof.events())
        result[name] = [ran_ours, (got - want[name]).abs().max().item()]
    print(json.dumps(result))
""")



def test_transformers_hybrid_mamba_models_run_our_kernels_and_agree():
    result = _last_json_line(HYBRIDS)
    assert set(result) == {"FalconMamba", "Jamba", "NemotronH", "Bamba", "GraniteMoeHybrid", "FalconH1", "Zamba2"}
    assert all(ran and diff < 1e-4 for ran, diff in result.values()), result
