"""Full-model benchmarks: M2Restore per backend against the paper's 0.17 s per 224×224 image.

Group ``model``: the ``paper()`` network, batch 1, 224×224, eval and inference mode, for each of
reference eager, ``torch.compile`` of the reference, our kernels (``torch`` on CPU, ``triton`` on
CUDA) and our kernels compiled (and, on CUDA, as a captured CUDA graph); fp32, bf16 autocast (on
CPU too: AMX) and, on CUDA, fp16 autocast; with the DA-CLIP pass (a random-weight ViT-B/32 DA-CLIP) and without it.

Group ``model-scaling``: our kernels without the prior (a fixed per-image cost) at 224², 512² and,
on CUDA, 1024², so the cost per pixel can be compared (``extra_info["us_per_kpx"]``).

``--quick`` times the ``tiny()`` network at 64×64 for one backend pair, without compile cases.
Cases and models come from ``m2restore.benchmark``, which ``m2restore bench`` also runs.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from m2restore.benchmark import PAPER_SECONDS, BenchSession, Case, make_inputs
from m2restore_kernels.testing import assert_close_rel

CUDA = torch.cuda.is_available()
OURS = "triton" if CUDA else "torch"
cuda_only = pytest.mark.cuda  # the root conftest skips these, with a reason, on CPU


def _param(case: Case, group: str):
    # Autocast dtypes, CUDA graphs and 1024² (minutes per call on a CPU) are GPU cases.
    marks = [cuda_only] if case.dtype == "fp16" or case.mode == "graph" or case.size > 512 else []
    label = f"{case.label}-{case.dtype}-prior_{'on' if case.prior else 'off'}-{case.size}"
    return pytest.param(case, id=f"{group}-{label}", marks=marks)


def _model_cases(quick: bool) -> list:
    if quick:
        return [_param(Case(b, prior=True, size=64), "quick") for b in ("reference", OURS)]
    variants = [("reference", "eager"), ("reference", "compile"),
                (OURS, "eager"), (OURS, "compile"), (OURS, "graph")]
    return [
        _param(Case(backend, mode, dtype, prior, 224), "paper")
        for dtype in ("fp32", "bf16", "fp16")
        for prior in (True, False)
        for backend, mode in variants
    ]


def _scaling_cases(quick: bool) -> list:
    sizes = (32, 64) if quick else (224, 512, 1024)
    dtypes = ("fp32",) if quick else ("fp32", "bf16")
    return [_param(Case(OURS, "eager", d, False, s), "quick" if quick else "paper")
            for d in dtypes for s in sizes]


def pytest_generate_tests(metafunc):
    quick = metafunc.config.getoption("--quick")
    if "model_case" in metafunc.fixturenames:
        metafunc.parametrize("model_case", _model_cases(quick))
    if "scaling_case" in metafunc.fixturenames:
        metafunc.parametrize("scaling_case", _scaling_cases(quick))


@pytest.fixture(scope="module")
def session(device, quick) -> BenchSession:
    return BenchSession("tiny" if quick else "paper", device)


def _time_case(bench, benchmark, session: BenchSession, case: Case) -> torch.Tensor:
    # Rotating inputs keeps a GPU from serving one image from its L2; a CPU has no such cache to
    # defeat, and one input lets the last timed output double as the one checked.
    inputs = make_inputs(case.size, session.device, 4 if CUDA else 1)
    ref = session.reference_output(case.prior, inputs[0])
    fwd = session.forward(case, inputs[0])
    rotation = itertools.cycle(inputs)
    out = bench(lambda: fwd(next(rotation)))
    if len(inputs) > 1:
        out = fwd(inputs[0])
    # Against the float32 eager reference network on the same weights and input.
    err = assert_close_rel(out, ref, "model", case.dtype)
    benchmark.extra_info.update(backend=case.label, dtype=case.dtype, prior=case.prior, size=case.size,
                                rel_err_vs_reference=err)
    if benchmark.stats is not None:  # None under --benchmark-disable
        median_s = benchmark.stats.stats.median
        benchmark.extra_info.update(us_per_kpx=median_s * 1e9 / case.size**2,
                                    ratio_to_paper=median_s / PAPER_SECONDS["M2Restore"])
    return out


@pytest.mark.benchmark(group="model")
def test_model(bench, benchmark, session, model_case):
    out = _time_case(bench, benchmark, session, model_case)
    assert out.shape == (1, 3, model_case.size, model_case.size)


@pytest.mark.benchmark(group="model-scaling")
def test_model_scaling(bench, benchmark, session, scaling_case):
    out = _time_case(bench, benchmark, session, scaling_case)
    assert out.shape == (1, 3, scaling_case.size, scaling_case.size)
