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
