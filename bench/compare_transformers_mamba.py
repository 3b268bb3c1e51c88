"""transformers' own Mamba and Mamba-2 language models on this CPU: transformers' reference PyTorch
code (what it runs on a CPU) against the same models after ``apply_to_transformers_mamba()``.

The call is process-wide and cannot be undone, so each model is timed on the reference first and
then on ours, in one process (the same weights and inputs), best of ``--rounds``; outputs are
checked to agree. Sizes: d_model 256, 4 layers, vocabulary 1024; forward and forward + backward
(training mode: the fused block ops) at L = 512; greedy generation of 32 tokens after 32.

    python bench/compare_transformers_mamba.py [--rounds 3] [--threads N] [--models mamba mamba2]
"""
from __future__ import annotations

import argparse
import os
import time

import torch

os.environ.setdefault("M2RESTORE_KERNELS_DISABLE", "triton")  # a CPU process: the C loops


def build(name: str):
    import transformers

    common = dict(vocab_size=1024, hidden_size=256, num_hidden_layers=4, pad_token_id=0, eos_token_id=1,
                  bos_token_id=2)
    if name == "mamba":
        config, cls = transformers.MambaConfig(state_size=16, expand=2, **common), transformers.MambaForCausalLM
    else:
        config = transformers.Mamba2Config(state_size=64, head_dim=64, num_heads=8, n_groups=1, expand=2,
                                           chunk_size=128, **common)
        cls = transformers.Mamba2ForCausalLM
    torch.manual_seed(0)
    return cls(config).float()


def cases(model, ids):
    def forward():
        model.eval()
        with torch.no_grad():
            return model(ids).logits

    def forward_backward():
        model.train()
        model.zero_grad()
        model(ids, labels=ids).loss.backward()

    def generate():
        model.eval()
        with torch.no_grad():
            return model.generate(ids[:, :32], max_new_tokens=32, do_sample=False, min_new_tokens=32)

    return {"forward L=512": forward, "forward+backward L=512": forward_backward, "generate 32 tokens": generate}


def best(fn, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--models", nargs="+", default=["mamba", "mamba2"], choices=["mamba", "mamba2"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    models = {name: build(name) for name in args.models}
    ids = torch.randint(3, 1024, (1, 512), generator=torch.Generator().manual_seed(1))
    timings, outputs = {}, {}
    for name, model in models.items():
        for case, fn in cases(model, ids).items():
            timings[name, case] = [best(fn, args.rounds)]
        outputs[name] = cases(model, ids)["forward L=512"]()
    from m2restore_kernels.integrations.transformers_mamba import apply_to_transformers_mamba

    apply_to_transformers_mamba()
    for name, model in models.items():
        torch.testing.assert_close(cases(model, ids)["forward L=512"](), outputs[name], rtol=1e-3, atol=1e-3)
        for case, fn in cases(model, ids).items():
            timings[name, case].append(best(fn, args.rounds))
    print("| model | case | transformers | ours | speed-up |\n|---|---|---|---|---|")
    for (name, case), (theirs, ours) in timings.items():
        print(f"| {name} | {case} | {theirs * 1e3:.0f} ms | {ours * 1e3:.0f} ms | {theirs / ours:.1f}× |")


if __name__ == "__main__":
    main()
