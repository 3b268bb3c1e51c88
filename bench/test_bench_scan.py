"""Selective-scan benchmarks at the MCDB latent sizes (groups ``scan <size> <pass>``).

The Mamba branch scans the latent of the image: batch 1, d_inner 768 (2 x 384 channels), d_state
16, over L = 784 tokens for a 224x224 input (28x28 latent) and L = 4096 for 512x512 (64x64).
Implementations: the sequential reference; ``torch``, what ``backend="torch"`` runs (on CPU the
fused C loop of ``csrc/selective_scan_cpu.c``, elsewhere the chunked scan); ``chunked``, the chunked
PyTorch scan itself; our Triton kernel (CUDA only: on CPU it would time the interpreter) and
mamba_ssm's CUDA kernel where it is installed; each for the forward pass and forward + backward.
Inputs follow the mixer's call: softplus(delta + bias) with mamba_ssm's dt initialisation, the
S4D-real A = -[1..16], D and z gating.

``--quick`` shrinks the channels and lengths so the whole group runs in seconds.
"""
from __future__ import annotations

import functools
import importlib
import math

import pytest
import torch

from m2restore_kernels import selective_scan, selective_scan_ref
from m2restore_kernels._backend import optional_op
from m2restore_kernels.testing import assert_close_rel

ss = importlib.import_module("m2restore_kernels.selective_scan")
ss_torch = importlib.import_module("m2restore_kernels.selective_scan.torch_impl")

CUDA = torch.cuda.is_available()
SIZES = {"latent224": (1, 768, 784, 16), "latent512": (1, 768, 4096, 16)}
QUICK_SIZES = {"latent224": (1, 32, 49, 16), "latent512": (1, 32, 256, 16)}
IMPLS = ("reference", "torch", "chunked", "triton", "mamba_ssm")


def scan_inputs(b, d, l, n, device, requires_grad):
    gen = torch.Generator().manual_seed(0)
    dt = torch.exp(torch.rand(d, generator=gen) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    tensors = dict(
        u=torch.randn(b, d, l, generator=gen), delta=torch.randn(b, d, l, generator=gen) * 0.5,
        A=-torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1), B=torch.randn(b, n, l, generator=gen),
        C=torch.randn(b, n, l, generator=gen), D=torch.ones(d), z=torch.randn(b, d, l, generator=gen),
        delta_bias=dt + torch.log(-torch.expm1(-dt)))
    return {k: v.to(device).requires_grad_(requires_grad) for k, v in tensors.items()}


@functools.lru_cache(maxsize=1)
def _float64_reference(size: tuple, device_type: str) -> torch.Tensor:
    """selective_scan_ref in float64 on the inputs of ``size`` (shared by every impl and pass)."""
    inputs = scan_inputs(*size, torch.device(device_type), False)
    return selective_scan_ref(**{k: v.double() for k, v in inputs.items()}, delta_softplus=True)


def _runner(impl: str):
    if impl == "reference":
        return selective_scan_ref
    if impl == "mamba_ssm":
        return optional_op(*ss.MAMBA_SELECTIVE_SCAN_FN)
    if impl == "chunked":
        def chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
            return ss_torch.selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)[0]
        return chunked
    return lambda *a, **k: selective_scan(*a, **k, backend=impl)


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", list(SIZES))
def test_bench_selective_scan(bench, benchmark, quick, device, size, impl, mode):
    if impl == "triton" and not CUDA:
        pytest.skip("the Triton kernel is timed on CUDA only (on CPU it runs in the interpreter)")
    if impl == "mamba_ssm" and not (CUDA and optional_op(*ss.MAMBA_SELECTIVE_SCAN_FN) is not None):
        pytest.skip("mamba_ssm's kernel needs CUDA and the mamba-ssm package")
    b, d, l, n = (QUICK_SIZES if quick else SIZES)[size]
    benchmark.group = f"scan {size} (b{b} d{d} l{l} n{n}) {mode}"
    backward = mode == "fwd_bwd"
    inputs = scan_inputs(b, d, l, n, device, backward)
    run = _runner(impl)
    grad = torch.randn(b, d, l, device=device)

    def step():
        if not backward:
            with torch.no_grad():
                return run(**inputs, delta_softplus=True)
        out = run(**inputs, delta_softplus=True)
        out.backward(grad)
        return out

    # the sequential loop is slow on long sequences (thousands of tiny ops): one round there
    rounds = 1 if impl == "reference" and l > 1000 else None
    out = bench(step, rounds=rounds)
    err = assert_close_rel(out, _float64_reference((b, d, l, n), device.type), "selective_scan", torch.float32)
    # Bytes that must move once in float32: the forward reads u, delta, z, B, C and writes y; the
    # backward also reads dy and those inputs again and writes du, ddelta, dz, dB, dC.
    per_token = 4 * d + 2 * n if not backward else (4 * d + 2 * n) + (4 * d + 2 * n) + (3 * d + 2 * n)
    benchmark.extra_info.update(min_mb=4 * b * l * per_token / 2**20)
    benchmark.extra_info.update(shape=f"b{b} d{d} l{l} n{n}", impl=impl, mode=mode,
                                rel_err_vs_float64=float(f"{err:.3g}"))
