"""``apply_to_transformers_mamba()``: transformers' own Mamba and Mamba-2 language models, unchanged,
run their SSM ops on our kernels on the CPU, and give what transformers' reference PyTorch code
gives: logits, every gradient (training mode: the fused block ops), greedy tokens (the cached
decode steps) and a prompt fed in two chunks (the second from the cache's state). Each model runs in a fresh process: the call changes process-wide state, and the
reference must run before it."""
from __future__ import annotations

import json
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


@pytest.mark.parametrize("name", ["mamba", "mamba2"])
def test_transformers_mamba_models_run_our_kernels_and_agree(name):
    env_disable = {"M2RESTORE_KERNELS_DISABLE": "triton"}  # the C loops, as a user's CPU process runs them
    import os

    proc = subprocess.run([sys.executable, "-c", SCRIPT, name], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env_disable})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["redone"], "no transformers op was switched"
    assert "m2restore_kernels::selective_scan" in result["ops"], result["ops"]
    assert result["logits"] < 1e-4 and result["resumed"] < 1e-4 and result["grad"] < 1e-3 and result["tokens"], result
