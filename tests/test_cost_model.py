"""The roofline cost model: FLOP formulas of the custom ops against hand counts, the per-component
FLOPs and bytes of a tiny network against the layer shapes, the bound, and the CLI's table."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import m2restore_kernels as K
from m2restore import M2RestoreConfig
from m2restore.cost_model import GPU, GPUS, Component, CostReport, analyze, fake_model, format_report

torch.manual_seed(0)


def counted(fn) -> dict:
    with FlopCounterMode(display=False) as counter:
        fn()
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


def test_moe_mlp_flops_are_the_expert_gemms():
    P, C, Hd, N, K_ = 37, 8, 12, 4, 2
    x = torch.randn(P, C)
    weights, indices = K.topk_softmax(torch.randn(P, N), K_, backend="torch")
    w1, b1, w2, b2 = torch.randn(N, C, Hd), torch.randn(N, Hd), torch.randn(N, Hd, C), torch.randn(N, C)
    flops = counted(lambda: K.moe_mlp(x, weights, indices, w1, b1, w2, b2, backend="torch"))
    # Each of the P·K (pixel, expert) pairs runs x·w1 (C×Hd) and h·w2 (Hd×C), 2 FLOPs per MAC.
    assert flops == {"m2restore_kernels.moe_mlp": 2 * P * K_ * (C * Hd * 2)}


def test_selective_scan_flops_hand_count():
    b, d, l, n = 2, 3, 5, 4
    u, delta, z = torch.randn(b, d, l), torch.rand(b, d, l), torch.randn(b, d, l)
    A, B, C, D = -torch.rand(d, n), torch.randn(b, n, l), torch.randn(b, n, l), torch.randn(d)
    flops = counted(lambda: K.selective_scan(u, delta, A, B, C, D, z, None, True, backend="torch"))
    # Per (b, d, l, n): exp(δA) 1, δ·B·u 2, h·a + bu 2, C·h summed 2 = 7; per (b, d, l): 8.
    assert flops == {"m2restore_kernels.selective_scan": 2 * 3 * 5 * (7 * 4 + 8)}


def test_gated_fusion_flops_hand_count():
    # The custom op is what the triton backend (and torch.compile) dispatches; its Triton forward
    # runs here in the interpreter.
    B, C, H, W = 1, 6, 5, 7
    y, mamba = torch.randn(B, C, H, W), torch.randn(B, C, H, W)
    params = (torch.randn(B, C), torch.randn(C, 1, 3, 3), torch.randn(C), torch.randn(C, C), torch.randn(C),
              torch.randn(1, C), torch.randn(1))
    flops = counted(lambda: torch.ops.m2restore_kernels.gated_fusion(y, mamba, *params, None, "triton"))
    # Per pixel: gate GEMM C×C, gate C→1, depthwise 3×3 over C channels; 2 FLOPs per MAC.
    assert flops == {"m2restore_kernels.gated_fusion": 2 * H * W * (C * C + C + 9 * C)}


@pytest.fixture(scope="module")
def tiny_report():
    config = M2RestoreConfig.tiny()
    return config, analyze(fake_model(config, prior="none"), 24, torch.bfloat16)


def test_conv_components_match_the_layer_shapes(tiny_report):
    config, report = tiny_report
    dim, px = config.dim, 24 * 24
    embed = report.component("patch embed")
    assert (embed.tensor_flops, embed.vector_flops) == (2 * px * 3 * dim * 9, 0)
    out = report.component("output conv")
    c_in = config.decoder_channels(1)
    assert out.flops == 2 * px * c_in * 3 * 9
    # Fused bytes, bf16: the input features, the output image and the weights, once each.
    assert out.min_bytes == 2 * (c_in * px + 3 * px + 3 * c_in * 9)
    assert out.launches == 1 + 1  # autocast's weight cast, the convolution


def test_dder_flops_are_router_plus_experts(tiny_report):
    config, report = tiny_report
    c, n, px = config.channels(1), config.num_experts, 24 * 24
    hidden = int(c * config.expert_ratio)
    router = 2 * px * (2 * c) * n  # x_p W_g
    small = 2 * config.prompt_dim * c + 2 * config.num_degradations * n  # prompt_proj, degradation_proj
    experts = 2 * px * config.top_k * (c * hidden * 2)
    assert report.component("DDER 1").flops == router + small + experts


def test_scan_is_its_own_vector_component(tiny_report):
    config, report = tiny_report
    scan = next(c for c in report.components if "selective scan" in c.name)
    d_inner, seq = config.mamba_expand * config.channels(4), (24 // 8) ** 2
    assert (scan.tensor_flops, scan.vector_flops) == (0, config.latent_blocks * d_inner * seq * (7 * config.mamba_d_state + 8))


def test_bound_is_max_of_compute_and_bytes():
    gpu = GPU("test", bf16=1e12, tf32=5e11, fp32=1e11, bandwidth=1e9)
    compute_bound = Component("a", tensor_flops=int(4e12), vector_flops=int(1e11), min_bytes=int(1e9))
    memory_bound = Component("b", tensor_flops=int(1e12), min_bytes=int(3e9), unfused_bytes=int(9e9))
    assert compute_bound.bound_s(gpu, torch.bfloat16) == pytest.approx(4 + 1)
    assert compute_bound.bound_s(gpu, torch.float32) == pytest.approx(8 + 1)
    assert memory_bound.bound_s(gpu, torch.bfloat16) == pytest.approx(3)
    report = CostReport("t", torch.bfloat16, [compute_bound, memory_bound])
    assert report.bound_s(gpu) == pytest.approx(8)
    # b's share of a 16 s goal is 16·3/8 = 6 s; operator by operator it needs 9 s.
    assert report.needs_fusion(memory_bound, gpu, 16.0) and not report.needs_fusion(memory_bound, gpu, 30.0)


def test_table_lists_every_component_and_the_bounds(tiny_report):
    _, report = tiny_report
    text = format_report(report, measured_ms={"triton+graph bf16": 25.0})
    for c in report.components:
        assert c.name in text
    for gpu in GPUS:
        assert f"lower bound on {gpu.name}:" in text
    assert "measured on this run's machine, triton+graph bf16: 25.00 ms" in text


def test_bench_roofline_cli_prints_the_bounds():
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "m2restore", "bench", "--config", "tiny", "--size", "16", "--no-prior",
         "--backends", "torch", "--dtypes", "fp32", "--rounds", "1", "--warmup", "0", "--device", "cpu",
         "--roofline"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "roofline lower bound of one forward: 16x16, batch 1, fp32, prior off" in proc.stdout
    for gpu in GPUS:
        assert f"lower bound on {gpu.name}:" in proc.stdout
    assert "measured on this run's machine, torch fp32:" in proc.stdout


def test_measured_components_find_the_slow_one(monkeypatch):
    """A component made slow by a planted cost is found, and its cost counts in it alone. The clock
    is a fake one that only the planted cost moves (by 1000 ms) besides a 1 µs tick per reading, so
    the attribution is checked exactly, whatever the machine's speed or load."""
    import types

    from m2restore import M2Restore, NullPrior, cost_model
    from m2restore.cost_model import components, measure_components

    now = [0.0]

    def perf_counter():
        now[0] += 1e-6
        return now[0]

    monkeypatch.setattr(cost_model, "time", types.SimpleNamespace(perf_counter=perf_counter))
    config = M2RestoreConfig.tiny(backend="torch")
    model = M2Restore(config, prior=NullPrior(config.num_degradations, config.prior_dim)).eval()
    conv = model.patch_embed.forward

    def slow(x):
        now[0] += 1.0
        return conv(x)

    monkeypatch.setattr(model.patch_embed, "forward", slow)
    times = measure_components(model, torch.rand(1, 3, 16, 16), torch.float32, rounds=1)
    assert set(times) == {name for name, _ in components(model)} | {"glue (pad, concat, reshapes)"}
    assert max(times, key=times.get) == "patch embed"
    # The planted second counts in its component only (plus a tick), not in the glue nor anywhere else.
    assert times["patch embed"] == pytest.approx(1000.0, abs=0.01)
    others = [t for name, t in times.items() if name != "patch embed"]
    assert all(0 <= t < 1 for t in others) and any(t > 0 for t in others)
