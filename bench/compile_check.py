"""Compile every Triton kernel of m2restore_kernels for an NVIDIA GPU, on a machine without one.

Triton compiles ahead of time for a named target (``ptxas`` ships inside its wheel), so the GPU
code of the kernels can be checked anywhere: that it compiles at all (the interpreter accepts
code that the GPU compiler rejects), and its registers per thread, spills to local memory and
shared memory, at the launch configurations the launchers pick for M2Restore's shapes (the
launchers' own config functions, asked for a CUDA device). What it cannot tell is speed.

    python bench/compile_check.py                # sm_90 (H100), every case
    python bench/compile_check.py --arch 86      # sm_86 (RTX 3090, the paper's card: 99 KiB shared)
    python bench/compile_check.py --quick        # bf16 at one shape per op (what the tests run)

Prints one row per kernel and case. Exit status: the number of cases that failed to compile or
need more shared memory than the architecture has; spills are reported, not failed. Runs without
``TRITON_INTERPRET`` (the interpreter replaces the kernels by Python functions); it removes the
variable from its own environment before importing triton.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402  (after the environment is settled)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from m2restore_kernels.tuning import dot_precision, gated_fusion as dgf, moe, selective_scan as scan  # noqa: E402

CUDA = torch.device("cuda")
# Shared memory one block may use (opt-in maximum), per compute capability.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class Case:
    """One kernel at one launch configuration. Pointer arguments default to ``dtype``; ``ptrs``
    names the others (int64 indices, float32 workspaces)."""
    op: str
    kernel: object
    label: str
    dtype: torch.dtype
    constexprs: dict
    num_warps: int
    num_stages: int = 3
    ptrs: dict = field(default_factory=dict)

    def source(self) -> ASTSource:
        signature, attrs = {}, {}
        for i, p in enumerate(self.kernel.params):
            if p.is_constexpr:
                signature[p.name] = "constexpr"
            elif p.name.endswith("_ptr"):
                signature[p.name] = "*" + self.ptrs.get(p.name, TRITON_DTYPE[self.dtype])
                attrs[(i,)] = [["tt.divisibility", 16]]  # torch's allocations are 16-byte aligned at least
            else:
                signature[p.name] = "i32"
        missing = {p.name for p in self.kernel.params if p.is_constexpr} - set(self.constexprs)
        if missing:
            raise ValueError(f"{self.kernel.__name__}: no value for constexpr {sorted(missing)}")
        return ASTSource(fn=self.kernel, signature=signature, constexprs=self.constexprs, attrs=attrs)


def _dtypes(quick: bool):
    return (torch.bfloat16,) if quick else (torch.float32, torch.bfloat16)


def moe_cases(quick: bool, shared_memory: int):
    """The three DDER widths of a 224x224 image (N = 6, K = 2), as the Triton path launches them;
    besides each dtype, bf16 GEMMs on float32 x and weights (autocast: cast as the tiles load)."""
    P, N, K = 50176, 6, 2
    widths = [(48, 127)] if quick else [(48 << lvl, int(2.66 * (48 << lvl))) for lvl in range(3)]
    block_n = moe.pow2_at_least(N, moe.MIN_TILE)
    i64 = dict(order_ptr="i64", offsets_ptr="i64", idx_ptr="i64")
    autocast = dict(x_ptr="fp32", w1_ptr="fp32", b1_ptr="fp32", w2_ptr="fp32", b2_ptr="fp32")
    # The GELU experts of the DDER; gated SwiGLU experts (a second w1 tile per hidden chunk) too.
    runs = [(dtype, "", {}, dict(ACT=moe.ACT_CODES["gelu"], GATED=False)) for dtype in _dtypes(quick)]
    runs.append((torch.bfloat16, " swiglu", {}, dict(ACT=moe.ACT_CODES["swiglu"], GATED=True)))
    if not quick:
        runs.append((torch.bfloat16, " autocast", autocast, dict(ACT=moe.ACT_CODES["gelu"], GATED=False)))
    for dtype, note, inputs, form in runs:
        for level, (C, Hd) in enumerate(widths):
            p = P >> (2 * level)
            cfg, bwd = (moe.default_config(K * p, N, C, Hd, CUDA, dtype, shared_memory, backward=b)
                        for b in (False, True))
            label = f"C={C} hidden={Hd}{note}"
            yield Case("moe", moe.KERNELS["moe_mlp_fwd"], label, dtype,
                       dict(HAS_B1=True, HAS_B2=True, BLOCK_N=block_n, **form, **_moe_tiles(cfg, dtype)),
                       ptrs=dict(**inputs, **i64), **_moe_run(cfg))
            yield Case("moe", moe.KERNELS["moe_mlp_bwd_dx"], label, dtype,
                       dict(HAS_B1=True, BLOCK_N=block_n, **form, **_moe_tiles(bwd, dtype)),
                       ptrs=dict(dxa_ptr="fp32", **inputs, **i64), **_moe_run(bwd))
            yield Case("moe", moe.KERNELS["moe_mlp_bwd_dw"], label, dtype,
                       dict(SPLIT=bwd.dw_split, HAS_B1=True, **form, **_moe_tiles(bwd, dtype)),
                       ptrs=dict(dw1_ptr="fp32", db1_ptr="fp32", dw2_ptr="fp32", db2_ptr="fp32", **inputs, **i64),
                       **_moe_run(bwd))
            if note:
                continue
            combine = dict(K=K, LSE=True, BLOCK_P=moe.combine_block_p(cfg.block_c, CUDA), BLOCK_C=cfg.block_c)
            yield Case("moe", moe.KERNELS["moe_combine_fwd"], label, dtype, combine, 4)
            yield Case("moe", moe.KERNELS["moe_combine_bwd"], label, dtype, combine, 4)
        if note:
            continue
        routing = dict(K=K, BLOCK_K=moe.pow2_at_least(K, moe.MIN_TILE))
        yield Case("moe", moe.KERNELS["topk_softmax_fwd"], f"N={N}", dtype,
                   dict(BLOCK_P=moe.topk_block_p(CUDA), BLOCK_N=block_n, **routing), 4, ptrs=i64)
        yield Case("moe", moe.KERNELS["topk_softmax_bwd"], f"N={N}", dtype,
                   dict(BLOCK_P=moe.topk_block_p(CUDA, backward=True), **routing), 4, ptrs=i64)
    plan = dict(K=K, BLOCK=moe.plan_block(CUDA), BLOCK_N=block_n)
    ints = dict(counts_ptr="i32", base_ptr="i32", **i64)
    yield Case("moe", moe.KERNELS["plan_count"], f"N={N}", torch.float32, plan, 4, ptrs=ints)
    yield Case("moe", moe.KERNELS["plan_scan"], f"N={N}", torch.float32,
               dict(BLOCK_T=moe.PLAN_SCAN_TILES, BLOCK_N=block_n), 4, ptrs=ints)
    yield Case("moe", moe.KERNELS["plan_scatter"], f"N={N}", torch.float32, plan, 4, ptrs=ints)


def _moe_tiles(cfg, dtype) -> dict:
    return dict(BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, BLOCK_H=cfg.block_h, PRECISION=dot_precision(dtype))


def _moe_run(cfg) -> dict:
    return dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def scan_cases(quick: bool):
    """The Mamba branch's scan at the 224x224 latent: d_inner 768, L 784, d_state 16, every option on."""
    cfg = scan.default_config(768, 784, 16, (), CUDA)
    tiles = dict(BLOCK_D=cfg.block_d, BLOCK_N=cfg.block_n, CHUNK=cfg.chunk)
    flags = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True)
    params = dict(A_ptr="fp32", D_ptr="fp32", bias_ptr="fp32")
    f32 = {f"{g}_ptr": "fp32" for g in ("ckpt", "dlast", "dA", "dD", "dbias", "dB", "dC")}
    for dtype in _dtypes(quick):
        # time-varying B and C (the model's), and both time-invariant (d, n), the other branch of each load
        for var in (True, False):
            form = dict(VAR_B=var, VAR_C=var)
            name = "d=768 L=784 n=16" + ("" if var else " BC(d,n)")
            yield Case("selective_scan", scan.KERNELS["selective_scan_fwd"], name, dtype,
                       dict(**flags, **form, **tiles), cfg.fwd_warps,
                       ptrs=dict(last_ptr="fp32", ckpt_ptr="fp32", **params))
            for flip in (False, True):  # the two ways of the reverse-time scan (scan.REVERSE_SCAN)
                yield Case("selective_scan", scan.KERNELS["selective_scan_bwd"], name + " flip" * flip, dtype,
                           dict(HAS_DLAST=True, REVERSE_BY_FLIP=flip, **flags, **form, **tiles), cfg.bwd_warps,
                           ptrs=dict(**f32, **params))


def gated_fusion_cases(quick: bool):
    """DGF at the MCDB widths of the paper's network (48 channels at 224x224 up to 384 at 28x28)."""
    shapes = [(48, 224)] if quick else [(48, 224), (96, 112), (192, 56), (384, 28)]
    for dtype in _dtypes(quick):
        for C, side in shapes:
            flags = dict(HAS_DWB=True, HAS_B1=True, HAS_B2=True)
            label = f"C={C} {side}x{side}"
            fwd, bwd = (dgf.default_config(C, side, side, CUDA, dtype, backward=b) for b in (False, True))
            yield Case("gated_fusion", dgf.KERNELS["gated_fusion_fwd"], label, dtype,
                       dict(HAS_RES=True, **flags, **_dgf_tiles(fwd, dtype)),
                       fwd.num_warps)
            yield Case("gated_fusion", dgf.KERNELS["gated_fusion_bwd_gate"], label, dtype,
                       dict(**flags, **_dgf_tiles(bwd, dtype)),
                       bwd.num_warps, ptrs=dict(part_c_ptr="fp32", part_dw_ptr="fp32", part_b2_ptr="fp32"))
            yield Case("gated_fusion", dgf.KERNELS["gated_fusion_bwd_input"], label, dtype, _dgf_tiles(bwd, dtype),
                       bwd.num_warps)


def _dgf_tiles(cfg, dtype) -> dict:
    return dict(BLOCK_P=cfg.block_p, BLOCK_W=cfg.block_w, BLOCK_C=cfg.block_c, BLOCK_N=cfg.block_n,
                DOT_PRECISION=dot_precision(dtype))


def resource_usage(kernel, cuobjdump: str) -> dict:
    """Registers and spilled bytes per thread of a compiled kernel, read off its cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if "REG:" in ln)
    fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
    # ptxas puts spilled registers in the stack frame (STACK); LOCAL is other local memory.
    return {"REG": int(fields["REG"]), "SPILL": int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_LIMIT),
                        help="compute capability x10 (default 90: H100/H200)")
    parser.add_argument("--quick", action="store_true", help="bf16 at one shape per op")
    args = parser.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    limit = SHARED_LIMIT[args.arch]
    print(f"triton {triton.__version__}, target sm_{args.arch} (shared memory limit {limit} B)")
    print(f"{'op':15s} {'kernel':32s} {'case':20s} {'dtype':9s} {'warps':>5s} {'stages':>6s} "
          f"{'regs':>4s} {'spill B':>7s} {'shared B':>8s}  status")
    failed = 0
    for case in [*moe_cases(args.quick, limit), *scan_cases(args.quick), *gated_fusion_cases(args.quick)]:
        head = (f"{case.op:15s} {case.kernel.__name__:32s} {case.label:20s} {str(case.dtype)[6:]:9s} "
                f"{case.num_warps:5d} {case.num_stages:6d}")
        try:
            compiled = triton.compile(case.source(), target=target,
                                      options=dict(num_warps=case.num_warps, num_stages=case.num_stages))
        except Exception as exc:  # the compiler's own error types vary between Triton versions
            failed += 1
            print(f"{head} {'':>4s} {'':>7s} {'':>8s}  COMPILE ERROR: {str(exc).strip().splitlines()[-1][:200]}")
            continue
        use = resource_usage(compiled, cuobjdump)
        shared = compiled.metadata.shared
        status = "ok"
        if shared > limit:
            failed += 1
            status = "SHARED MEMORY OVER THE LIMIT"
        elif use["SPILL"]:
            status = "spills"
        print(f"{head} {use['REG']:4d} {use['SPILL']:7d} {shared:8d}  {status}")
    print(f"{failed} case(s) failed")
    return failed


if __name__ == "__main__":
    sys.exit(main())
