"""The MoE drop-ins against the clients' own dispatch on this CPU, alternating in one process
(bench/RESULTS.md): one DDER of a 224x224 image (the authors' dispatcher vs ``moe_mlp``) and a
Mixtral-shaped transformers block (its eager expert loop vs the one-call patch), float32,
forward and forward+backward. Prints the best of ``--rounds`` per variant and alternation.

    python bench/compare_moe_dropins.py [--rounds 3] [--alternations 2] [--case dder|mixtral]
                                        [--threads 1] [--clock cpu]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import test_bench_moe as moe_bench  # noqa: E402


def _best(fn, rounds: int, clock=time.perf_counter) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times)


def _dder_steps():
    params = [t.requires_grad_() for t in moe_bench._inputs(moe_bench.SHAPES[(224, 0)])]

    def step(variant, backward):
        fn = moe_bench.DISPATCH[variant]
        with torch.set_grad_enabled(backward):
            y = fn(params[0], *params[1:])
            if backward:
                torch.autograd.grad(y.sum(), params)
    return {"authors": lambda b: step("authors", b), "moe_mlp": lambda b: step("torch", b)}


def _mixtral_steps():
    block, x = moe_bench._mixtral_block.__wrapped__(moe_bench.MIXTRAL_BLOCK)
    params = [x.requires_grad_(), *block.parameters()]

    def step(implementation, backward):
        block.experts.config._experts_implementation = implementation
        with torch.set_grad_enabled(backward):
            y = block(x)
            if backward:
                torch.autograd.grad(y.sum(), params)
    return {"transformers eager": lambda b: step("eager", b), "one-call patch": lambda b: step("m2restore", b)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--alternations", type=int, default=2)
    parser.add_argument("--case", choices=("all", "dder", "mixtral"), default="all")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: the process's CPU time, which a contended machine inflates less than wall "
                             "time; meaningful with --threads 1 only (idle-spinning threads count too)")
    args = parser.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock")
    cases = {"dder": ("DDER 1 of 224x224 (P 50176, C 48, Hd 127, N 6, K 2)", _dder_steps),
             "mixtral": ("Mixtral block (tokens 2048, C 256, Hd 512, N 8, K 2)", _mixtral_steps)}
    for case, steps in [(name, make()) for key, (name, make) in cases.items() if args.case in ("all", key)]:
        for backward in (False, True):
            best = {name: float("inf") for name in steps}
            for _ in range(args.alternations):
                for name, step in steps.items():
                    best[name] = min(best[name], _best(lambda: step(backward), args.rounds, clock))
            client, ours = best.values()
            cells = ", ".join(f"{name} {t * 1e3:.0f} ms" for name, t in best.items())
            print(f"{case} {'fwd+bwd' if backward else 'fwd'}: {cells}; speedup {client / ours:.2f}x")


if __name__ == "__main__":
    main()
