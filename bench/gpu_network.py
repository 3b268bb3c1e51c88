"""The whole network on a GPU in one call: forward modes, a kernel profile, the training step.

    python bench/gpu_network.py --out DIR [--budget-s 360] [--quick]

Every case runs in a process of its own under a hard time limit (a failed CUDA graph capture can
leave CUDA unusable, and inductor can compile for minutes), most valuable first, and writes its own
JSON, so a case that fails or runs out of time costs only itself. At the end DIR holds
``network.json`` (every case, the machine, versions, commit, date), ``network.md`` (the
tables for bench/RESULTS.md) and ``cases/`` (each case's JSON, the reference output). Cases, ``paper()`` with a random-weight DA-CLIP prior, batch 1,
bf16 autocast, 224²:

* forward, reference vs ours (triton): eager; ours as a captured CUDA graph; ours under
  ``torch.compile`` (custom ops as single nodes) captured in a CUDA graph; the reference under
  ``torch.compile`` (its expert dispatcher syncs with the host, so no graph);
* profile: torch.profiler's kernels of one forward of ours (eager), top by device time with
  their launch counts, and the number of kernels per forward;
* components: the time of each of the paper's components in an eager forward of ours (CUDA
  events at module boundaries), beside its computed lower bound (``m2restore.cost_model``);
* training step: forward + backward (L1 + λ·balance), bf16 autocast, batch 8 of 128² crops, the
  prior given as tensors, ours vs the reference.

``--quick`` runs the same cases on the tiny config at 32² (training at 16², batch 2) with few
rounds; on a CPU "ours" is the torch backend, the dtype fp32 and the graph cases are skipped: the
CPU test of this script.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from m2restore.benchmark import (BenchSession, Case, _git_commit, capture_cuda_graph, make_inputs, relative_error,
                                 time_fn)

# name: (seconds it may take on a GPU, what it is)
CASES = {
    "ref-eager": (90, "forward, reference, eager"),
    "ours-eager": (60, "forward, ours, eager"),
    "ours-graph": (60, "forward, ours, CUDA graph"),
    "profile": (60, "kernel profile of one forward, ours, eager"),
    "components": (60, "measured time per component, ours, eager, beside the roofline"),
    "train-ours": (90, "training step fwd+bwd, ours"),
    "train-ref": (90, "training step fwd+bwd, reference"),
    "ours-compile-graph": (150, "forward, ours, torch.compile + CUDA graph"),
    "ref-compile": (150, "forward, reference, torch.compile"),
}


def _settings(args) -> dict:
    cuda = torch.cuda.is_available()
    if args.quick:
        # This project's CPUs run bf16 convolutions far slower than fp32: the CPU check runs fp32.
        return dict(config="tiny", size=32, train_size=16, train_batch=2, rounds=2, train_rounds=2, warmup=1,
                    dtype="bf16" if cuda else "fp32", cuda=cuda, ours="triton" if cuda else "torch")
    return dict(config="paper", size=224, train_size=128, train_batch=8, rounds=20, train_rounds=5, warmup=2,
                dtype="bf16", cuda=cuda, ours="triton" if cuda else "torch")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward_case(name: str, s: dict, out: Path) -> dict:
    device = torch.device("cuda" if s["cuda"] else "cpu")
    backend = "reference" if name.startswith("ref") else s["ours"]
    if "graph" in name and not s["cuda"]:
        return {"skipped": "CUDA graphs need a GPU"}
    session = BenchSession(s["config"], device)
    inputs = make_inputs(s["size"], device, 4 if s["cuda"] else 2)
    mode = "graph" if name == "ours-graph" else "eager"
    case = Case(backend, mode, s["dtype"], True, s["size"])
    t0 = time.perf_counter()
    if "compile" in name:
        model = torch.compile(session.model(backend, True))

        def fwd(x):
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False,
                                                        enabled=s["dtype"] == "bf16"):
                return model(x)

        if "graph" in name:
            fwd = capture_cuda_graph(fwd, inputs[0])
        else:
            fwd(inputs[0])
    else:
        fwd = session.forward(case, inputs[0])
    _sync(device)
    setup_s = time.perf_counter() - t0
    times = time_fn(fwd, inputs, device, s["rounds"], s["warmup"])
    y = fwd(inputs[0]).float()
    ref_path = out / "cases" / "ref_out.pt"
    if name == "ref-eager":
        torch.save(y.cpu(), ref_path)
    err = relative_error(y.cpu(), torch.load(ref_path)) if ref_path.exists() else None
    return {"ms_median": sorted(times)[len(times) // 2], "ms_min": min(times), "times_ms": times,
            "setup_s": setup_s, "rel_err_vs_ref": err, "backend": backend}


def _profile_case(s: dict, out: Path, rows: int = 30) -> dict:
    from torch.profiler import ProfilerActivity, profile

    device = torch.device("cuda" if s["cuda"] else "cpu")
    session = BenchSession(s["config"], device)
    (x,) = make_inputs(s["size"], device, 1)
    fwd = session.forward(Case(s["ours"], "eager", s["dtype"], True, s["size"]), x)
    for _ in range(3):  # every kernel specialisation compiled before profiling
        fwd(x)
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s["cuda"] else [])
    with profile(activities=activities) as prof:
        fwd(x)
        _sync(device)
    kernels: dict[str, list[float]] = {}
    for e in prof.events():
        on_device = e.device_type == torch.autograd.DeviceType.CUDA
        if s["cuda"] and not on_device or not s["cuda"] and (on_device or e.cpu_parent is not None):
            continue  # on a GPU: kernels; on a CPU: top-level operators
        us = getattr(e, "device_time_total", 0) if on_device else e.cpu_time_total
        entry = kernels.setdefault(e.name, [0.0, 0])
        entry[0] += us
        entry[1] += 1
    total_us = sum(v[0] for v in kernels.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:rows]
    table = [{"name": k, "us": v[0], "launches": v[1], "share": v[0] / total_us if total_us else None}
             for k, v in top]
    return {"what": "CUDA kernels" if s["cuda"] else "top-level CPU operators",
            "total_us": total_us, "launches": sum(v[1] for v in kernels.values()), "top": table}


def _components_case(s: dict, out: Path) -> dict:
    from m2restore.benchmark import model_config
    from m2restore.cost_model import measure_components, roofline_table

    device = torch.device("cuda" if s["cuda"] else "cpu")
    session = BenchSession(s["config"], device)
    (x,) = make_inputs(s["size"], device, 1)
    dtype = torch.bfloat16 if s["dtype"] == "bf16" else torch.float32
    times = measure_components(session.model(s["ours"], True), x, dtype)
    table = roofline_table(model_config(s["config"], s["ours"]), s["size"], s["dtype"], prior=True,
                           markdown=True, component_ms=times)
    (out / "cases" / "components.md").write_text(table + "\n")
    return {"component_ms": times, "table": table}


def _train_case(name: str, s: dict) -> dict:
    from m2restore import M2Restore
    from m2restore.benchmark import model_config
    from m2restore.losses import m2restore_loss

    device = torch.device("cuda" if s["cuda"] else "cpu")
    backend = "reference" if name == "train-ref" else s["ours"]
    torch.manual_seed(0)
    config = model_config(s["config"], backend)
    model = M2Restore(config, prior=_null_prior(config)).to(device).train()  # prior given as tensors
    b, size = s["train_batch"], s["train_size"]
    g = torch.Generator().manual_seed(0)
    x, gt = (torch.rand(b, 3, size, size, generator=g).to(device) for _ in range(2))
    prior = (torch.softmax(torch.randn(b, config.num_degradations, generator=g), -1).to(device),
             torch.randn(b, config.prior_dim, generator=g).to(device))

    def step(_):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=s["dtype"] == "bf16"):
            out, aux = model(x, prior=prior, return_aux=True)
            loss = m2restore_loss(out.float(), gt, aux.balance_loss, config.balance_weight)
        loss.backward()
        return loss

    times = time_fn(step, [x], device, s["train_rounds"], s["warmup"])
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if s["cuda"] else None
    return {"ms_median": sorted(times)[len(times) // 2], "ms_min": min(times), "times_ms": times,
            "batch": b, "crop": size, "peak_mem_mb": peak, "backend": backend}


def _null_prior(config):
    from m2restore import NullPrior

    return NullPrior(config.num_degradations, config.prior_dim)


def worker(name: str, args) -> int:
    s = _settings(args)
    out = Path(args.out)
    if name == "profile":
        result = _profile_case(s, out)
    elif name == "components":
        result = _components_case(s, out)
    elif name.startswith("train"):
        result = _train_case(name, s)
    else:
        result = _forward_case(name, s, out)
    (out / "cases" / f"{name}.json").write_text(json.dumps({"case": name, **result}, indent=1))
    return 0


# ----------------------------------------------------------------------------- driver

def machine() -> dict:
    import triton

    facts = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
             "cuda": torch.version.cuda, "commit": _git_commit(),
             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        facts["driver"] = smi.stdout.strip() or None
    else:
        from m2restore.benchmark import cpu_model

        facts["cpu"] = cpu_model()
    return facts


def markdown(report: dict) -> str:
    m = report["machine"]
    where = m.get("gpu") or m.get("cpu")
    lines = [f"Machine: {where}" + (f", driver {m['driver']}" if m.get("driver") else "")
             + f"; torch {m['torch']}, triton {m['triton']}, CUDA {m['cuda']}; commit {m['commit']}; {m['date']}",
             f"Settings: {report['settings']}", "",
             "| case | what | status | ms (median) | ms (min) | setup s | rel err vs ref eager |", "|---|---|---|---|---|---|---|"]
    for name, (_, what) in CASES.items():
        r = report["cases"].get(name, {})
        if name in ("profile", "components"):
            continue
        status = r.get("status", "not run")
        fmt = lambda v, f: format(v, f) if isinstance(v, (int, float)) else "-"  # noqa: E731
        lines.append(f"| {name} | {what} | {status} | {fmt(r.get('ms_median'), '.2f')} | {fmt(r.get('ms_min'), '.2f')} "
                     f"| {fmt(r.get('setup_s'), '.1f')} | {fmt(r.get('rel_err_vs_ref'), '.1e')} |")
    prof = report["cases"].get("profile", {})
    if prof.get("top"):
        lines += ["", f"Profile of one forward (ours, eager): {prof['what']}, {prof['launches']} launches, "
                  f"{prof['total_us'] / 1e3:.2f} ms in all", "", "| name | µs | launches | share |", "|---|---|---|---|"]
        lines += [f"| `{k['name'][:90]}` | {k['us']:.1f} | {k['launches']} | {100 * (k['share'] or 0):.1f} % |"
                  for k in prof["top"]]
    comps = report["cases"].get("components", {})
    if comps.get("table"):
        lines += ["", f"Per component, ours, eager ({where}): measured µs beside the computed bounds", "",
                  comps["table"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for network.json, network.md and cases/")
    parser.add_argument("--quick", action="store_true", help="tiny config, small sizes, few rounds (a CPU check)")
    parser.add_argument("--budget-s", type=float, default=360.0, help="stop starting cases after this many seconds")
    parser.add_argument("--case-limit-s", type=float, default=None,
                        help="each case's time limit (default: the seconds it may take on a GPU, per case); a CPU "
                             "run, slower and maybe on a busy machine, gives a hang guard here")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated from {','.join(CASES)}")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = Path(args.out)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    if args.worker:
        return worker(args.worker, args)
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"gpu_network.py: --cases: unknown {unknown}, choose from {','.join(CASES)}")
        return 2
    deadline = time.monotonic() + args.budget_s
    report = {"machine": machine(), "settings": _settings(args), "cases": {}}
    failed = 0
    for name in names:
        limit = min(args.case_limit_s or CASES[name][0], deadline - time.monotonic())
        if limit < 10:
            report["cases"][name] = {"status": "skipped: budget spent"}
            failed += 1
            continue
        cmd = [sys.executable, __file__, "--out", str(out), "--worker", name] + ["--quick"] * args.quick
        print(f"=== {name} (limit {limit:.0f} s)", flush=True)
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, timeout=limit, capture_output=True, text=True)
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode}): " + (
                proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit:.0f} s"
        path = out / "cases" / f"{name}.json"
        result = json.loads(path.read_text()) if path.exists() and status == "ok" else {}
        if result.get("skipped"):
            status = f"skipped: {result['skipped']}"
        failed += not status.startswith(("ok", "skipped: CUDA"))
        report["cases"][name] = {**result, "status": status, "wall_s": time.monotonic() - t0}
        print(f"=== {name}: {status} in {time.monotonic() - t0:.0f} s", flush=True)
    (out / "network.json").write_text(json.dumps(report, indent=1))
    (out / "network.md").write_text(markdown(report))
    print(markdown(report))
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    raise SystemExit(main())
