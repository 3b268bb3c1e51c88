"""``m2restore bench`` end to end on the tiny network, its timing loop, and imports without open_clip."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from m2restore.benchmark import PAPER_SECONDS, Case, time_fn
from m2restore.cli import main

COLUMNS = ("backend", "dtype", "prior", "size", "ms/img", "img/s", "peak MB", "vs ref", "/0.17s", "rel err")


def _table_rows(out: str) -> dict[str, list[str]]:
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("backend"))
    rows = {}
    for line in lines[header + 2:]:
        if line.startswith("-"):
            break
        label, *cells = line.split()
        rows[label] = cells
    return rows


def test_bench_cli_prints_table_and_writes_json(tmp_path, capsys):
    pytest.importorskip("open_clip")
    path = tmp_path / "sub" / "model.json"
    rc = main(["bench", "--config", "tiny", "--size", "32", "--rounds", "1", "--device", "cpu", "--full",
               "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    header = next(line for line in out.splitlines() if line.startswith("backend"))
    for column in COLUMNS:
        assert column in header
    assert f"{torch.get_num_threads()} threads" in out
    assert "M2Restore 170 ms/img" in out and "AdaIR 130 ms/img" in out
    assert set(_table_rows(out)) == {"reference", "torch"}

    report = json.loads(path.read_text())
    assert report["config"] == "tiny" and report["rounds"] == 1
    assert report["paper_seconds_per_image"]["M2Restore"] == PAPER_SECONDS["M2Restore"]
    # CPU with --full: reference and ours, each in fp32 and in bf16 autocast.
    results = {(r["backend"], r["dtype"]): r for r in report["results"]}
    assert set(results) == {(b, d) for b in ("reference", "torch") for d in ("fp32", "bf16")}
    for r in results.values():
        assert (r["prior"], r["size"], r["mode"]) == (True, 32, "eager")
        assert r["error"] is None and len(r["times_ms"]) == 1 and r["ms_per_image"] > 0
        assert r["images_per_s"] == pytest.approx(1e3 / r["ms_per_image"])
        assert r["ratio_to_paper"] == pytest.approx(r["ms_per_image"] / 170.0)
        assert r["peak_mem_mb"] > 0
    ref, ours = results["reference", "fp32"], results["torch", "fp32"]
    assert ref["speedup_vs_reference"] == pytest.approx(1.0)
    assert ours["speedup_vs_reference"] == pytest.approx(ref["ms_per_image"] / ours["ms_per_image"])
    # Same weights, same images: the reference reproduces itself and our path agrees in fp32;
    # bf16 autocast (8 mantissa bits) stays within a few percent.
    assert ref["rel_err_vs_reference"] < 1e-6
    assert ours["rel_err_vs_reference"] < 1e-4
    for backend in ("reference", "torch"):
        assert 0 < results[backend, "bf16"]["rel_err_vs_reference"] < 5e-2


def test_bench_cli_reports_a_failing_case_and_goes_on(tmp_path, capsys):
    path = tmp_path / "model.json"
    rc = main(["bench", "--config", "tiny", "--size", "16", "--rounds", "1", "--warmup", "0", "--device", "cpu",
               "--no-prior", "--backends", "reference", "--dtypes", "fp32,fp16", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "failed: ValueError: dtype fp16 autocast is benchmarked on CUDA only" in out
    results = json.loads(path.read_text())["results"]
    assert [(r["dtype"], r["error"] is None, r["prior"]) for r in results] == [
        ("fp32", True, False), ("fp16", False, False)]


@pytest.mark.parametrize("flags, message", [
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--threads", "0"], "--threads must be at least 1"),
])
def test_bench_cli_rejects_bad_options(flags, message, capsys):
    rc = main(["bench", "--config", "tiny", "--device", "cpu", *flags])
    assert rc == 2
    assert capsys.readouterr().err.startswith(f"m2restore bench: {message}")


@pytest.mark.parametrize("flag, value", [("--backends", "torch,cuda-magic"), ("--dtypes", "fp8")])
def test_bench_cli_names_the_choices_of_a_listed_option(flag, value, capsys):
    with pytest.raises(SystemExit) as exc:  # argparse's usage error, while parsing
        main(["bench", "--config", "tiny", flag, value])
    assert exc.value.code == 2
    wrong = value.split(",")[-1]
    choices = "auto, triton, torch, reference" if flag == "--backends" else "fp32, bf16, fp16"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"m2restore bench: error: argument {flag}: {wrong} not among {choices}")


def test_time_fn_warms_up_then_times_each_round_rotating_inputs():
    inputs = [torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)]
    seen = []
    times = time_fn(lambda x: seen.append(int(x.item())), inputs, torch.device("cpu"), rounds=4, warmup=2)
    assert seen == [0, 1, 2, 0, 1, 2]
    assert len(times) == 4 and all(t >= 0 for t in times)


@pytest.mark.parametrize("kwargs, word", [
    ({"rounds": 0, "warmup": 1}, "rounds"), ({"rounds": 1, "warmup": -1}, "warmup"),
])
def test_time_fn_validates_rounds(kwargs, word):
    with pytest.raises(ValueError, match=word):
        time_fn(lambda x: x, [torch.zeros(1)], torch.device("cpu"), **kwargs)


@pytest.mark.parametrize("kwargs, word", [
    ({"backend": "cuda"}, "backend"), ({"backend": "torch", "mode": "jit"}, "mode"),
    ({"backend": "torch", "dtype": "fp8"}, "dtype"), ({"backend": "torch", "size": 4}, "size"),
])
def test_case_validates_its_fields(kwargs, word):
    with pytest.raises(ValueError, match=word):
        Case(**kwargs)


_WITHOUT_OPEN_CLIP = textwrap.dedent("""
    import sys

    class BlockOpenClip:
        def find_spec(self, name, path=None, target=None):
            if name == "open_clip" or name.startswith("open_clip."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, BlockOpenClip())
    import importlib
    import m2restore_kernels, m2restore
    from m2restore import M2Restore, M2RestoreConfig
    from m2restore.cli import COMMANDS
    for module, _ in COMMANDS.values():  # every subcommand, DA-CLIP's cache included
        importlib.import_module(module)
    model = M2Restore(M2RestoreConfig.tiny())
    assert "open_clip" not in sys.modules, "open_clip was imported"
    try:
        from m2restore.prior import DAClipPrior
    except ImportError:
        print("DAClipPrior needs open_clip")
    print("imports ok")
""")


def test_imports_subcommands_and_model_construction_need_no_open_clip():
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0")}
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_OPEN_CLIP], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == "DAClipPrior needs open_clip imports ok".split()


def test_graph_mode_is_only_asked_of_the_capturable_backend():
    """A failed capture can leave CUDA unusable, so ``--graph`` adds triton cases only (after eager)."""
    import argparse

    from m2restore.cli.bench import add_arguments, cases_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--backends", "reference,torch,triton", "--dtypes", "fp32", "--graph"])
    cases = cases_from_args(args, torch.device("cuda"))
    assert [(c.backend, c.mode) for c in cases] == [
        ("reference", "eager"), ("torch", "eager"), ("triton", "eager"), ("triton", "graph")]


# ------------------------------------------------------------------ progress, estimate, default plan

def _forward_lines(err: str) -> list[str]:
    return [line.strip() for line in err.splitlines() if line.strip().startswith("forward ")]


def test_bench_prints_an_estimate_then_a_line_per_forward(capsys):
    from m2restore.cli.bench import planned_forwards

    rc = main(["bench", "--config", "tiny", "--size", "16,24", "--no-prior", "--device", "cpu", "--rounds", "1",
               "--warmup", "0", "--backends", "torch", "--dtypes", "fp32"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    cases = [Case("torch", "eager", "fp32", False, s) for s in (16, 24)]
    total = planned_forwards(cases, 1, 0)
    assert total == 2 + 2  # one timed call per case, one reference output per size
    err = captured.err.splitlines()
    estimate = next(i for i, line in enumerate(err) if line.startswith(f"m2restore bench: estimate {total} forwards"))
    forwards = _forward_lines(captured.err)
    assert [line.split(":")[0] for line in forwards] == [f"forward {i}/{total}" for i in range(1, total + 1)]
    assert err.index("    " + forwards[0]) < estimate < err.index("    " + forwards[1])  # from the first forward
    assert [line.split(": ")[1].split(",")[0] for line in forwards] == [
        "reference fp32 16px reference output", "torch fp32 16px timed 1/1",
        "reference fp32 24px reference output", "torch fp32 24px timed 1/1"]
    assert all("elapsed, about" in line and line.endswith("s left") for line in forwards)
    assert "forward " not in captured.out  # progress on stderr, the report on stdout


def test_bench_default_cpu_plan_is_small_whatever_auto_picks(monkeypatch):
    import argparse

    from m2restore import precision
    from m2restore.cli.bench import ROUNDS, WARMUP, add_arguments, cases_from_args, planned_forwards

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for native in ("0", "1"):
        monkeypatch.setenv(precision.NATIVE_BF16_ENV, native)
        cases = cases_from_args(parser.parse_args([]), torch.device("cpu"))
        assert {c.size for c in cases} == {224}
        # paper() at 224², reference and ours: 9 forwards, or 17 where bf16 is native (bf16 ~1.4x faster).
        assert planned_forwards(cases, ROUNDS["cpu"], WARMUP["cpu"]) == (17 if native == "1" else 9)


@pytest.mark.parametrize("first_s, expected", [
    (1.0, (3, 1)),  # 9 forwards of 1 s fit: the defaults stay
    (25.0, (3, 0)),  # 9 × 25 s do not, 7 × 25 s do: the warm-up goes
    (35.0, (2, 0)),  # then rounds: 5 × 35 s
    (500.0, (1, 0)),  # at least one timed round of each case, whatever the budget
])
def test_a_default_run_is_cut_to_the_budget_from_its_first_forward(first_s, expected):
    from m2restore.cli.bench import DEFAULT_BUDGET_S, fit_to_budget, planned_seconds

    cases = [Case("reference", size=224), Case("torch", size=224)]
    assert fit_to_budget(first_s, cases, 3, 1) == expected
    rounds, warmup = expected
    assert planned_seconds(first_s, cases, rounds, warmup) <= DEFAULT_BUDGET_S or expected == (1, 0)
    # Scaled by pixels from the first case's size: references at 448² and 224², one call of each case.
    assert planned_seconds(2.0, [Case("torch", size=448)] + cases, 1, 0) == pytest.approx(2.0 * (1 + 0.25 + 1.5))


def test_a_default_run_says_when_it_was_cut(monkeypatch, capsys):
    from m2restore.cli import bench

    monkeypatch.setattr(bench, "DEFAULT_BUDGET_S", 0.0)
    assert main(["bench", "--config", "tiny", "--size", "16", "--no-prior", "--device", "cpu",
                 "--backends", "torch", "--dtypes", "fp32"]) == 0
    captured = capsys.readouterr()
    assert "the default run is cut to its least (one timed round per case), still over the 0 min" in captured.err
    assert "0 warm-up + 1 timed rounds" in captured.out
    assert len(_forward_lines(captured.err)) == 2  # the reference output and one timed call
