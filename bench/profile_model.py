"""Where one forward of the paper network spends its time: torch.profiler's top operators.

    python bench/profile_model.py [--backend triton] [--dtype bf16] [--size 224] [--rows 25]

Builds ``paper()`` the way ``m2restore bench`` does (random weights, random-weight DA-CLIP prior
unless ``--no-prior``), warms it up, profiles a few forwards and prints the operators sorted by
device time on CUDA (by CPU time on a CPU), so a lent GPU's minutes go to the kernels that matter.
Kernels launched by Triton show under their own names (``_moe_mlp_fwd_kernel`` ...).
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from m2restore.benchmark import BenchSession, Case, make_inputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None, help="model backend (default: triton on CUDA, torch on CPU)")
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--config", default="paper", choices=["paper", "tiny"])
    parser.add_argument("--no-prior", action="store_true")
    parser.add_argument("--steps", type=int, default=3, help="profiled forwards")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = args.backend or ("triton" if device.type == "cuda" else "torch")
    session = BenchSession(args.config, device)
    case = Case(backend, "eager", args.dtype, not args.no_prior, args.size)
    (x,) = make_inputs(args.size, device, 1)
    fwd = session.forward(case, x)
    for _ in range(3):  # compile every kernel specialisation before profiling
        fwd(x)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            fwd(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"{args.config}() {backend} {args.dtype} {args.size}px, prior {'off' if args.no_prior else 'on'}, "
          f"{args.steps} forwards on {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'CPU'}")
    print(prof.key_averages().table(sort_by=sort_by, row_limit=args.rows, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
