"""The ``m2restore`` command as a user meets it: run as a subprocess, it answers ``--help`` without
importing torch, ends every error in one line with the right exit status (a traceback only with
``--debug``), picks the precision of ``--dtype auto`` by the machine, and runs the README's
restore command."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

import m2restore.cli as cli
from m2restore import M2RestoreConfig
from m2restore.precision import cpu_flags, native_bf16, resolve_precision
from m2restore.restore import DEMO_WEIGHTS, load_model

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "m2restore" / "assets" / "samples"


def m2restore(*argv: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 600):
    """``m2restore ARGV...`` in a fresh interpreter (the entry point calls the same ``main``)."""
    run_env = {k: v for k, v in os.environ.items() if k != "M2RESTORE_DEBUG"}
    run_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "m2restore", *argv], capture_output=True, text=True,
                          env=run_env, cwd=cwd, timeout=timeout)


def assert_one_line_error(proc, status: int, *words: str) -> str:
    assert proc.returncode == status, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0]
    return lines[0]


# ------------------------------------------------------------------------------ fast --help

_NO_TORCH = textwrap.dedent("""
    import sys
    from m2restore.cli import main
    for argv, status in (["--help"], 0), (["bogus"], 2), ([], 2), (["--debug"], 2):
        try:
            main(argv)
        except SystemExit as exc:
            assert exc.code == status, (argv, exc.code)
        else:
            raise AssertionError(f"{argv} did not exit")
    import m2restore
    assert "torch" not in sys.modules, "torch was imported"
    print("no torch")
""")


def test_help_and_command_errors_do_not_import_torch():
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-2:] == ["no", "torch"]
    assert "invalid choice: 'bogus'" in proc.stderr and "the following arguments are required" in proc.stderr


# Runs main(argv) and exits with its status, or with 99 naming the heavy modules it imported.
_MAIN_WITHOUT_HEAVY_IMPORTS = textwrap.dedent("""
    import sys
    from m2restore.cli import main
    try:
        status = main(sys.argv[1:])
    except SystemExit as exc:
        status = exc.code
    heavy = [m for m in ("torch", "numpy", "triton", "m2restore_kernels") if m in sys.modules]
    if heavy:
        print("imported " + " ".join(heavy), file=sys.stderr)
        status = 99
    sys.exit(status)
""")


def _main_without_heavy_imports(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _MAIN_WITHOUT_HEAVY_IMPORTS, *argv], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_subcommand_help_builds_its_parser_without_torch(command):
    """Building a subcommand's parser imports only its module, and that without torch, numpy or
    Triton. Also: its options must not clash with the global ones (-v/--verbose, --debug), which
    only building it shows, as it is only built when chosen."""
    proc = _main_without_heavy_imports(command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: m2restore {command} ")
    assert "--debug" in proc.stdout and "--verbose" in proc.stdout


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_subcommand_usage_error_without_torch(command):
    """An unknown option ends in argparse's usage and one error line, status 2, before any heavy import."""
    proc = _main_without_heavy_imports(command, "--no-such-option")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith(f"m2restore {command}: error: "), proc.stderr
    assert proc.stderr.startswith(f"usage: m2restore {command} ") and proc.stderr.endswith(errors[0] + "\n")


# ------------------------------------------------------- mistakes answered before torch loads

# Each mistake in a path or an option value, per command, with words its one error line must hold.
# {t} is a folder holding: img.png (an image by its name), notes.txt, empty/, pairs/input+gt/,
# nogt/input/, file.txt, weights_empty/, ckpt.pt.
_MISTAKES = {
    "restore input missing": (["restore", "{t}/nope.png", "-o", "{t}/out"], "input not found: {t}/nope.png"),
    "restore folder without images": (["restore", "{t}/empty", "-o", "{t}/out"], "no images in the folder"),
    "restore not an image": (["restore", "{t}/notes.txt", "-o", "{t}/out"], "not an image file"),
    "restore output is a file": (["restore", "{t}/img.png", "-o", "{t}/file.txt"], "--out {t}/file.txt is a file"),
    "restore output = input": (["restore", "{t}/img.png", "-o", "{t}"], "would overwrite the input"),
    "restore --max-memory": (["restore", "{t}/img.png", "-o", "{t}/out", "--max-memory", "lots"], "--max-memory"),
    "restore --tile": (["restore", "{t}/img.png", "-o", "{t}/out", "--tile", "13"], "--tile 13"),
    "restore --tile-overlap": (["restore", "{t}/img.png", "-o", "{t}/out", "--tile", "64", "--tile-overlap", "60"],
                               "--tile-overlap 60"),
    "restore --weights": (["restore", "{t}/img.png", "-o", "{t}/out", "--weights", "{t}/weights_empty"],
                          "--weights: {t}/weights_empty must hold config.json"),
    "restore --device": (["restore", "{t}/img.png", "-o", "{t}/out", "--device", "tpu"], "--device tpu"),
    "restore --prior-checkpoint": (["restore", "{t}/img.png", "-o", "{t}/out", "--prior-checkpoint", "{t}/no.pt"],
                                   "--prior-checkpoint {t}/no.pt: not found"),
    "eval --data missing": (["eval", "--data", "{t}/nope", "--weights", "{w}"], "--data {t}/nope: not found"),
    "eval --data without gt": (["eval", "--data", "{t}/nogt", "--weights", "{w}"], "input/ and gt/"),
    "eval --limit": (["eval", "--data", "{t}/pairs", "--weights", "{w}", "--limit", "0"], "--limit must be at least 1"),
    "eval --out": (["eval", "--data", "{t}/pairs", "--weights", "{w}", "--out", "{t}/file.txt"], "--out"),
    "train --data": (["train", "--data", "{t}/nope", "--out", "{t}/run"], "--data {t}/nope: not found"),
    "train --batch-size": (["train", "--data", "{t}/pairs", "--out", "{t}/run", "--batch-size", "0"],
                           "--batch-size must be at least 1, got 0"),
    "train --resume": (["train", "--data", "{t}/pairs", "--out", "{t}/run", "--resume"], "checkpoint.pt: not found"),
    "train --config": (["train", "--data", "{t}/pairs", "--out", "{t}/run", "--config", "{t}/nope.json"],
                       "--config"),
    "routing --data": (["routing", "--data", "rain={t}/nope"], "--data {t}/nope: not found"),
    "routing --per-type": (["routing", "--data", "{t}/pairs", "--per-type", "0"], "--per-type must be at least 1"),
    "prior-cache --images": (["prior-cache", "--checkpoint", "{t}/ckpt.pt", "--images", "{t}/empty", "--out",
                              "{t}/c.safetensors"], "no image files"),
    "prior-cache --checkpoint": (["prior-cache", "--checkpoint", "{t}/no.pt", "--images", "{t}/pairs", "--out",
                                  "{t}/c.safetensors"], "--checkpoint {t}/no.pt: not found"),
    "convert-authors checkpoint": (["convert-authors", "{t}/no.ckpt", "-o", "{t}/conv"], "{t}/no.ckpt: not found"),
    "convert-authors --top-k": (["convert-authors", "{t}/ckpt.pt", "-o", "{t}/conv", "--top-k", "0"], "--top-k"),
    "demo --weights": (["demo", "--weights", "{t}/weights_empty", "--out", "{t}/demo"], "--weights"),
    "demo --minutes": (["demo", "--train", "--minutes", "0", "--out", "{t}/demo"], "--minutes must be positive"),
    "bench --device": (["bench", "--device", "tpu"], "--device tpu"),
    "bench --size": (["bench", "--size", "4"], "--size must be at least 8"),
    "bench --threads": (["bench", "--threads", "0"], "--threads must be at least 1"),
    "bench --json": (["bench", "--json", "{t}/empty"], "--json {t}/empty is a folder"),
}

# Runs main(argv) for each argv of a JSON list, recording its status and stderr, then the heavy
# modules imported by any of them.
_MISTAKES_RUNNER = textwrap.dedent("""
    import contextlib, io, json, sys
    from m2restore.cli import main
    results = []
    for argv in json.loads(sys.argv[1]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                status = main(argv)
            except SystemExit as exc:
                status = exc.code
        results.append({"status": status, "stderr": err.getvalue()})
    heavy = [m for m in ("torch", "numpy", "PIL", "triton", "m2restore_kernels") if m in sys.modules]
    print(json.dumps({"results": results, "heavy": heavy}))
""")


@pytest.fixture(scope="module")
def mistakes(tmp_path_factory) -> dict:
    """name -> (status, stderr, the expected words) of every mistake, all run in one fresh interpreter;
    and "heavy": the modules of torch, numpy or Pillow that any of them imported."""
    t = tmp_path_factory.mktemp("mistakes")
    for folder in ("empty", "pairs/input", "pairs/gt", "nogt/input", "weights_empty"):
        (t / folder).mkdir(parents=True)
    for name in ("img.png", "notes.txt", "file.txt", "ckpt.pt", "pairs/input/a.png", "pairs/gt/a.png"):
        (t / name).write_bytes(b"not decoded by any check")
    fill = {"t": str(t), "w": str(DEMO_WEIGHTS)}
    argvs = [[a.format(**fill) for a in argv] for argv, _ in _MISTAKES.values()]
    proc = subprocess.run([sys.executable, "-c", _MISTAKES_RUNNER, json.dumps(argvs)], capture_output=True,
                          text=True, timeout=300, cwd=t)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    out = {name: (r["status"], r["stderr"], words.format(**fill))
           for (name, (_, words)), r in zip(_MISTAKES.items(), report["results"])}
    return {**out, "heavy": report["heavy"]}


@pytest.mark.parametrize("name", list(_MISTAKES))
def test_each_mistake_is_one_line_with_status_2(mistakes, name):
    status, stderr, words = mistakes[name]
    command = _MISTAKES[name][0][0]
    assert status == 2, (name, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith(f"m2restore {command}: ") and words in lines[0], (lines[0], words)


def test_mistakes_are_answered_before_torch_numpy_or_pillow_load(mistakes):
    assert mistakes["heavy"] == []


def test_every_command_that_takes_paths_has_its_mistakes_checked():
    commands = {argv[0] for argv, _ in _MISTAKES.values()}
    assert commands == set(cli.COMMANDS)


def test_package_names_load_lazily():
    import m2restore

    assert {"M2Restore", "M2RestoreConfig", "NullPrior", "M2RestoreAux"} <= set(dir(m2restore))
    from m2restore.model import M2Restore

    assert m2restore.M2Restore is M2Restore
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        m2restore.Nope  # noqa: B018


def test_help_of_the_cli_lists_commands_and_global_options():
    proc = m2restore("--help")
    assert proc.returncode == 0, proc.stderr
    for word in (*cli.COMMANDS, "--debug", "--verbose"):
        assert word in proc.stdout


# --------------------------------------------------------------------------------- errors

def test_usage_error_is_one_line_with_status_2():
    assert_one_line_error(m2restore("bench", "--rounds", "0"), 2,
                          "m2restore bench: --rounds must be at least 1, got 0")
    if not torch.cuda.is_available():
        assert_one_line_error(m2restore("bench", "--device", "cuda"), 2, "m2restore bench: --device cuda",
                              "no CUDA device")


def test_argparse_errors_keep_status_2():
    proc = m2restore("bench", "--rounds", "many")
    assert proc.returncode == 2
    assert "m2restore bench: error: argument --rounds: invalid int value: 'many'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unexpected_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    (tmp_path / "set" / "input").mkdir(parents=True)
    (tmp_path / "set" / "gt").mkdir()  # passes the checks of the paths; open_pairs finds no images in it
    args = ("eval", "--weights", str(DEMO_WEIGHTS), "--data", str(tmp_path / "set"), "--out", str(tmp_path / "o"))
    assert_one_line_error(m2restore(*args), 1, "m2restore eval: ")
    for proc in (m2restore("--debug", *args), m2restore(*args, "--debug"),
                 m2restore(*args, env={"M2RESTORE_DEBUG": "1"})):
        assert proc.returncode == 1
        assert "Traceback (most recent call last)" in proc.stderr


def _fake_command(monkeypatch, error: BaseException) -> None:
    module = types.ModuleType("m2restore_fake_command")
    module.add_arguments = lambda parser: parser.add_argument("--x", default=None)

    def run(args):
        raise error

    module.run = run
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.COMMANDS, "fake", (module.__name__, "raises"))
    monkeypatch.delenv("M2RESTORE_DEBUG", raising=False)


@pytest.mark.parametrize("error, status, expected", [
    (cli.errors.UsageError("--x: give a number"), 2, "m2restore fake: --x: give a number"),
    (cli.errors.InputError("a.png: not an image"), 1, "m2restore fake: a.png: not an image"),
    (RuntimeError("boom\nsecond line"), 1,
     "m2restore fake: RuntimeError: boom (rerun with --debug, or M2RESTORE_DEBUG=1, to see the traceback)"),
    (KeyboardInterrupt(), 130, "m2restore fake: interrupted"),
])
def test_main_turns_each_kind_of_error_into_its_line_and_status(monkeypatch, capsys, error, status, expected):
    _fake_command(monkeypatch, error)
    assert cli.main(["fake"]) == status
    captured = capsys.readouterr()
    assert captured.err == expected + "\n" and captured.out == ""
    with pytest.raises(type(error)):
        cli.main(["fake", "--debug"])


# ------------------------------------------------------------------------------ --dtype auto

@pytest.mark.parametrize("device, machine, expected", [
    ("cpu", dict(capability="AVX2", flags={"avx2", "fma"}), "fp32"),  # an AVX2 EPYC (Zen 2/3)
    ("cpu", dict(capability="AVX512", flags={"avx512f", "avx512bw"}), "fp32"),  # Skylake-SP: no bf16
    ("cpu", dict(capability="AVX512", flags={"avx512f", "avx512_bf16"}), "bf16"),  # Cooper Lake, Zen 4
    ("cpu", dict(capability="AVX2", flags={"avx512f", "avx512_bf16"}), "fp32"),  # AVX-512 kernels off
    ("cpu", dict(capability="AVX512", flags={"avx512_bf16", "amx_bf16", "amx_tile"}), "bf16"),  # Sapphire Rapids
    ("cpu", dict(capability="DEFAULT", flags=set()), "fp32"),  # e.g. an ARM CPU
    ("cuda", dict(cuda_capability=(8, 0)), "bf16"),  # A100
    ("cuda", dict(cuda_capability=(9, 0)), "bf16"),  # H100
    ("cuda", dict(cuda_capability=(7, 5)), "fp32"),  # T4
    ("mps", {}, "fp32"),
])
def test_dtype_auto_decision_table(device, machine, expected):
    precision, why = resolve_precision("auto", device, **machine)
    assert precision == expected
    assert native_bf16(device, **machine) == (expected == "bf16", why)
    assert why  # the reason -v prints


def test_explicit_precisions_pass_through_and_unknown_ones_fail():
    for name in ("fp32", "bf16", "fp16"):
        assert resolve_precision(name, "cpu")[0] == name
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8", "cpu")


def test_cpu_flags_reads_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 avx512_bf16 amx_bf16\n\n"
                    "processor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(str(info)) == {"fpu", "avx2", "avx512_bf16", "amx_bf16"}
    assert cpu_flags(str(tmp_path / "absent")) == frozenset()


def test_restore_reexports_the_precision_table():
    from m2restore.precision import PRECISIONS
    from m2restore.restore import PRECISIONS as restore_precisions

    assert restore_precisions is PRECISIONS


# ------------------------------------------------------------- the README's restore command

def _readme_restore_command() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    lines = [line for line in readme.splitlines() if line.startswith("m2restore restore ")]
    assert lines, "README has no `m2restore restore` command line"
    return lines[0].split("#")[0].split()


def test_readme_restore_command_runs_as_written(tmp_path):
    """The README's command, run from a folder laid out like the repository (``m2restore/`` holds
    the samples it points at): exit 0, one output per sample, no traceback, no NullPrior warning
    (the demo weights were trained without a prior), and -v names the precision auto chose."""
    command = _readme_restore_command()
    (tmp_path / "m2restore").symlink_to(ROOT / "m2restore", target_is_directory=True)
    proc = m2restore(*command[1:], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "no degradation prior" not in proc.stderr
    out_dir = tmp_path / command[command.index("-o") + 1]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(p.name for p in SAMPLES.iterdir())

    one = sorted(SAMPLES.iterdir())[0]
    proc = m2restore("-v", "restore", str(one), "-o", str(tmp_path / "v"))
    assert proc.returncode == 0, proc.stderr
    chosen, why = resolve_precision("auto", "cpu", load_model(DEMO_WEIGHTS).config)
    assert f"--dtype auto chose {chosen} on cpu: {why}" in proc.stderr
    assert (tmp_path / "v" / one.name).is_file()


# ----------------------------------------------------------------------------------- bench

def test_bench_defaults_follow_the_machine_and_print_progress_per_case(tmp_path):
    proc = m2restore("bench", "--config", "tiny", "--size", "16", "--rounds", "1", "--no-prior", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    chosen, why = resolve_precision("auto", "cpu", M2RestoreConfig.tiny())
    dtypes = ["fp32"] + (["bf16"] if chosen == "bf16" else [])
    cases = [(b, d) for d in dtypes for b in ("reference", "torch")]
    assert f"dtypes {','.join(dtypes)}: {why}" in proc.stdout
    assert "1 warm-up + 1 timed rounds" in proc.stdout
    for number, (backend, dtype) in enumerate(cases, 1):
        assert f"[{number}/{len(cases)}] {backend:<18} {dtype:<5} prior off 16px" in proc.stdout


def test_bench_default_dtypes_and_full_sweep(monkeypatch):
    import argparse

    from m2restore import precision
    from m2restore.cli.bench import ROUNDS, ROUNDS_FULL, add_arguments, cases_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cpu = torch.device("cpu")
    monkeypatch.delenv(precision.NATIVE_BF16_ENV, raising=False)  # the flags below decide
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    for flags, dtypes in (({"avx2"}, ["fp32"]), ({"avx512_bf16"}, ["fp32", "bf16"])):
        monkeypatch.setattr(precision, "cpu_flags", lambda flags=flags: frozenset(flags))
        cases = cases_from_args(parser.parse_args([]), cpu)  # paper(), wide enough for bf16
        assert [(c.backend, c.dtype) for c in cases] == [(b, d) for d in dtypes for b in ("reference", "torch")]
        tiny = cases_from_args(parser.parse_args(["--config", "tiny"]), cpu)  # too narrow: fp32 only
        assert [(c.backend, c.dtype) for c in tiny] == [(b, "fp32") for b in ("reference", "torch")]
        full = cases_from_args(parser.parse_args(["--full"]), cpu)
        assert sorted({c.dtype for c in full}) == ["bf16", "fp32"]
    assert ROUNDS["cpu"] < ROUNDS_FULL["cpu"] and ROUNDS["cuda"] < ROUNDS_FULL["cuda"]


