"""Time the whole network per backend against the paper's 0.17 s per image (``m2restore bench``).

The paper (Table III) reports 0.17 s for M2Restore and 0.13 s for AdaIR per 224×224 image on an
RTX 3090. This module times ``M2Restore`` (batch 1, eval, ``torch.inference_mode``) for each
combination of backend (``reference`` = the paper's plain PyTorch, ``torch``/``triton`` = ours),
execution mode (eager, ``torch.compile``, a captured CUDA graph), dtype (fp32, or bf16/fp16
autocast) and prior (the DA-CLIP pass on or off), and prints one table.

Every case runs the same weights (copied from the reference model) on the same rotating inputs, and
reports its relative error against the fp32 eager reference, so a speed-up cannot hide a wrong
answer. ``bench/test_bench_model.py`` reuses ``BenchSession`` and ``time_fn`` with pytest-benchmark.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import platform
import resource
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from m2restore.config import MODEL_BACKENDS
from m2restore.restore import PRECISIONS

#: Paper, Table III: seconds per 224×224 image on an NVIDIA RTX 3090.
PAPER_SECONDS = {"M2Restore": 0.17, "AdaIR": 0.13}
PAPER_SETUP = "RTX 3090, 224×224, paper Table III"

MODES = ("eager", "compile", "graph")
# Backends a CUDA graph can capture: the reference and torch paths of the expert dispatch size their
# per-expert work from counts read back to the host, which capture forbids.
CAPTURABLE = ("triton",)


@dataclass(frozen=True)
class Case:
    """One timed configuration. ``dtype`` other than fp32 means autocast to that dtype."""

    backend: str
    mode: str = "eager"
    dtype: str = "fp32"
    prior: bool = True
    size: int = 224

    def __post_init__(self):
        if self.backend not in MODEL_BACKENDS:
            raise ValueError(f"backend must be one of {MODEL_BACKENDS}, got {self.backend!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.dtype not in PRECISIONS:
            raise ValueError(f"dtype must be one of {tuple(PRECISIONS)}, got {self.dtype!r}")
        if self.size < 8:
            raise ValueError(f"size must be at least 8 pixels, got {self.size}")

    @property
    def label(self) -> str:
        return self.backend if self.mode == "eager" else f"{self.backend}+{self.mode}"

    @property
    def baseline(self) -> "Case":
        """The case this one's speed-up and error are measured against: fp32 eager reference."""
        return Case("reference", "eager", "fp32", self.prior, self.size)


@dataclass
class Result:
    """The timings (ms per call) of one case, or the error that stopped it."""

    case: Case
    times_ms: list[float] = field(default_factory=list)
    peak_mem_mb: float | None = None
    rel_err: float | None = None
    error: str | None = None
    speedup: float | None = None

    @property
    def ms(self) -> float | None:
        return statistics.median(self.times_ms) if self.times_ms else None

    def to_dict(self) -> dict:
        ms = self.ms
        return {
            **dataclasses.asdict(self.case),
            "label": self.case.label,
            "ms_per_image": ms,
            "ms_min": min(self.times_ms) if self.times_ms else None,
            "times_ms": self.times_ms,
            "images_per_s": 1e3 / ms if ms else None,
            "peak_mem_mb": self.peak_mem_mb,
            "speedup_vs_reference": self.speedup,
            "ratio_to_paper": ms / (1e3 * PAPER_SECONDS["M2Restore"]) if ms else None,
            "rel_err_vs_reference": self.rel_err,
            "error": self.error,
        }


# ----------------------------------------------------------------------------------- machine

def cpu_model() -> str:
    """The processor's model name (Linux /proc/cpuinfo), else what ``platform`` knows."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return cpu


def machine_name(device: torch.device) -> str:
    """GPU name, or CPU model and the number of threads torch uses."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (the CUDA allocator, or this process's RSS high-water mark)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Linux resets VmHWM when "5" is written here; without it the CPU peak is the process's maximum.
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # kB on Linux


# ------------------------------------------------------------------------------- timing loop

def time_fn(
    fn: Callable[[torch.Tensor], object],
    inputs: Sequence[torch.Tensor],
    device: torch.device,
    rounds: int,
    warmup: int,
    progress: Callable[[str, float], None] | None = None,
) -> list[float]:
    """Call ``fn`` on ``inputs`` in turn, ``warmup`` untimed then ``rounds`` timed; ms per call.

    Rotating the inputs keeps a GPU from serving one image from its L2 cache. On CUDA each call is
    bracketed by events on the current stream and the loop synchronises once at the end, so host
    overhead that the GPU hides is not counted; on CPU it is wall-clock time, and ``progress``
    (CPU only: CUDA calls return before the GPU is done) hears of each call after it, with what it
    was ("warm-up 1/2", "timed 3/5") and the seconds it took.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}")
    if not inputs:
        raise ValueError("inputs must hold at least one tensor")
    if device.type == "cuda":
        for i in range(warmup):
            fn(inputs[i % len(inputs)])
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(rounds)]
        for i, (start, end) in enumerate(events):
            start.record()
            fn(inputs[(warmup + i) % len(inputs)])
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for i in range(warmup + rounds):
        t0 = time.perf_counter()
        fn(inputs[i % len(inputs)])
        seconds = time.perf_counter() - t0
        if i >= warmup:
            times.append(seconds * 1e3)
        if progress is not None:
            progress(f"warm-up {i + 1}/{warmup}" if i < warmup else f"timed {i - warmup + 1}/{rounds}", seconds)
    return times


def make_inputs(size: int, device: torch.device, count: int, seed: int = 0) -> list[torch.Tensor]:
    """``count`` distinct random images (1, 3, size, size) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, 3, size, size, generator=g).to(device) for _ in range(count)]


# ------------------------------------------------------------------------------------ models

def model_config(name: str, backend: str):
    from m2restore import M2RestoreConfig

    factories = {"paper": M2RestoreConfig.paper, "tiny": M2RestoreConfig.tiny}
    if name not in factories:
        raise ValueError(f"config must be one of {tuple(factories)}, got {name!r}")
    return dataclasses.replace(factories[name](), backend=backend)


#: A DA-CLIP small enough for quick runs: ViT-B/32's structure with 2 narrow blocks per tower.
TINY_DACLIP_CFG = {
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "width": 64, "heads": 2, "layers": 2},
}


def make_prior(config_name: str, device: torch.device) -> torch.nn.Module:
    """A random-weight DA-CLIP matching the config's names and ``prior_dim``: the real ViT-B/32
    for ``paper``, :data:`TINY_DACLIP_CFG` for ``tiny``."""
    from m2restore.prior import DAClipPrior

    config = model_config(config_name, "reference")
    tiny = {**TINY_DACLIP_CFG, "embed_dim": config.prior_dim} if config_name == "tiny" else None
    torch.manual_seed(0)
    prior = DAClipPrior(model_name="ViT-B-32", names=config.degradation_names, model_cfg=tiny)
    if prior.embed_dim != config.prior_dim:
        raise ValueError(f"DA-CLIP embeds in {prior.embed_dim} dims but config {config_name!r} "
                         f"expects prior_dim={config.prior_dim}")
    return prior.to(device).eval()


class BenchSession:
    """Builds the cases of one config on one device, sharing the prior and the weights.

    The reference model is built once; every other backend loads its weights, so all cases compute
    the same function and their outputs can be compared with the reference's.
    """

    def __init__(self, config_name: str, device: torch.device, seed: int = 0):
        self.config_name = config_name
        self.device = torch.device(device)
        self.seed = seed
        self._prior: torch.nn.Module | None = None
        self._state: dict[str, torch.Tensor] | None = None
        self._reference_out: dict[tuple[bool, int], torch.Tensor] = {}
        #: Seconds the forward of each reference output took (model construction not counted).
        self.reference_seconds: dict[tuple[bool, int], float] = {}

    def prior(self, on: bool):
        from m2restore import NullPrior

        if not on:
            config = model_config(self.config_name, "reference")
            return NullPrior(config.num_degradations, config.prior_dim)
        if self._prior is None:
            self._prior = make_prior(self.config_name, self.device)
        return self._prior

    def model(self, backend: str, prior: bool) -> torch.nn.Module:
        """A fresh model of ``backend`` on the session's device, eval mode, with the shared weights."""
        from m2restore import M2Restore

        if self._state is None:
            # Weights are drawn once, by the reference's construction, then shared by all backends.
            torch.manual_seed(self.seed)
            reference = M2Restore(model_config(self.config_name, "reference"), prior=self.prior(False))
            self._state = reference.state_dict()
        model = M2Restore(model_config(self.config_name, backend), prior=self.prior(prior))
        model.load_state_dict(self._state)
        return model.to(self.device).eval()

    def forward(self, case: Case, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """The timed callable of ``case``: eval, inference mode, autocast, compiled or captured.

        ``example`` warms up a captured CUDA graph (and is its static input's shape).
        """
        if case.mode == "graph" and self.device.type != "cuda":
            raise ValueError("mode 'graph' (CUDA graph capture) needs a CUDA device")
        if case.dtype == "fp16" and self.device.type != "cuda":
            # CPUs have no fast fp16 matmul; bf16 autocast is the CPU's fast mode (AMX, AVX512-BF16).
            raise ValueError("dtype fp16 autocast is benchmarked on CUDA only (use bf16 on CPU)")
        model = self.model(case.backend, case.prior)
        net = torch.compile(model) if case.mode == "compile" else model
        dtype = PRECISIONS[case.dtype]
        device_type = self.device.type

        def fwd(x: torch.Tensor) -> torch.Tensor:
            # Autocast's weight cache must be off while a CUDA graph is captured.
            with torch.inference_mode(), torch.autocast(
                device_type, dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=False
            ):
                return net(x)

        return capture_cuda_graph(fwd, example) if case.mode == "graph" else fwd

    def reference_output(self, prior: bool, x: torch.Tensor) -> torch.Tensor:
        """The fp32 eager reference's output for ``x`` (computed once per prior and size; the
        seconds its forward took go into :attr:`reference_seconds`)."""
        key = (prior, x.shape[-1])
        if key not in self._reference_out:
            fwd = self.forward(Case("reference", prior=prior, size=x.shape[-1]), x)
            t0 = time.perf_counter()
            self._reference_out[key] = fwd(x).float().clone()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.reference_seconds[key] = time.perf_counter() - t0
        return self._reference_out[key]


def capture_cuda_graph(fwd: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor):
    """``fwd`` captured in a CUDA graph after three warm-up calls on a side stream; returns
    ``replay(x)``, which copies ``x`` (``example``'s shape) into the graph's input and returns its
    (reused) output tensor. ``fwd`` must not sync with the host; autocast inside it needs
    ``cache_enabled=False``."""
    static_in = example.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
        for _ in range(3):
            fwd(static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fwd(static_in)

    def replay(x: torch.Tensor) -> torch.Tensor:
        static_in.copy_(x)
        graph.replay()
        return static_out

    return replay


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30))


def run_cases(
    session: BenchSession,
    cases: Iterable[Case],
    rounds: int,
    warmup: int,
    n_inputs: int,
    log: Callable[[str], None] = print,
    progress: Callable[[Case, str, float], None] | None = None,
) -> list[Result]:
    """Time each case; a case that fails is recorded with its error and the others go on.

    Each case's relative error is that of its first call (on ``inputs[0]``, a warm-up call unless
    ``warmup`` is 0), so no forward is spent on it alone. ``progress`` hears of every forward on a
    CPU after it: the case, what the call was ("reference output", "warm-up 1/1", "timed 2/3") and
    its seconds.
    """
    results = []
    inputs_by_size: dict[int, list[torch.Tensor]] = {}
    cases = list(cases)
    for number, case in enumerate(cases, 1):
        if case.size not in inputs_by_size:
            inputs_by_size[case.size] = make_inputs(case.size, session.device, n_inputs)
        inputs = inputs_by_size[case.size]
        result = Result(case)
        log(f"  [{number}/{len(cases)}] {case.label:<18} {case.dtype:<5} prior {'on ' if case.prior else 'off'} "
            f"{case.size}px ...")
        try:
            fresh = (case.prior, case.size) not in session.reference_seconds
            ref = session.reference_output(case.prior, inputs[0])
            if fresh and progress is not None and session.device.type != "cuda":
                progress(case.baseline, "reference output", session.reference_seconds[case.prior, case.size])
            reset_peak_memory(session.device)
            fwd = session.forward(case, inputs[0])
            first: list[torch.Tensor] = []

            def call(x: torch.Tensor) -> torch.Tensor:
                y = fwd(x)
                if not first:  # time_fn's first call is on inputs[0]
                    first.append(y.float().clone())
                return y

            result.times_ms = time_fn(call, inputs, session.device, rounds, warmup,
                                      progress and (lambda what, seconds: progress(case, what, seconds)))
            result.peak_mem_mb = peak_memory_mb(session.device)
            result.rel_err = relative_error(first[0], ref)
            log(f"    {result.ms:.2f} ms, rel err {result.rel_err:.1e}")
        except Exception as exc:  # noqa: BLE001 - one broken variant must not hide the others
            result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
            log(f"    failed: {result.error}")
        finally:
            if session.device.type == "cuda":
                torch.cuda.empty_cache()
        results.append(result)
    baselines = {r.case: r.ms for r in results if r.ms}
    for r in results:
        base = baselines.get(r.case.baseline)
        r.speedup = base / r.ms if base and r.ms else None
    return results


# ------------------------------------------------------------------------------------ report

def format_table(results: Sequence[Result], machine: str) -> str:
    head = (f"{'backend':<18} {'dtype':<5} {'prior':<5} {'size':>5} {'ms/img':>9} {'img/s':>8} "
            f"{'peak MB':>8} {'vs ref':>7} {'/0.17s':>7} {'rel err':>8}")
    lines = [f"machine: {machine}", head, "-" * len(head)]
    for r in results:
        c = r.case
        prefix = f"{c.label:<18} {c.dtype:<5} {'on' if c.prior else 'off':<5} {c.size:>5}"
        if r.error:
            lines.append(f"{prefix} failed: {r.error}")
            continue
        d = r.to_dict()
        speedup = f"{r.speedup:.2f}x" if r.speedup else "-"
        lines.append(
            f"{prefix} {d['ms_per_image']:>9.2f} {d['images_per_s']:>8.2f} {r.peak_mem_mb:>8.0f} "
            f"{speedup:>7} {d['ratio_to_paper']:>7.3f} {r.rel_err:>8.1e}"
        )
    lines += [
        "-" * len(head),
        f"paper's figures ({PAPER_SETUP}): M2Restore {PAPER_SECONDS['M2Restore'] * 1e3:.0f} ms/img, "
        f"AdaIR {PAPER_SECONDS['AdaIR'] * 1e3:.0f} ms/img",
        "vs ref: speed-up over fp32 eager reference (same prior, size); /0.17s: our time / the paper's "
        "(< 1 is faster); rel err: ||out - ref|| / ||ref|| against fp32 eager reference",
    ]
    return "\n".join(lines)


def _git_commit() -> str | None:
    """``$M2RESTORE_COMMIT`` if set (a copy of the tree whose .git is stale, as on a lent GPU
    machine), else ``git describe`` of this checkout."""
    if os.environ.get("M2RESTORE_COMMIT"):
        return os.environ["M2RESTORE_COMMIT"]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def report_json(results: Sequence[Result], device: torch.device, config: str, rounds: int, warmup: int) -> dict:
    """The results of a run on ``device`` with the ``config`` model, with the machine, versions and
    commit that produced them."""
    return {
        "machine": machine_name(device),
        "device": str(device),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "config": config,
        "rounds": rounds,
        "warmup": warmup,
        "paper_seconds_per_image": {**PAPER_SECONDS, "setup": PAPER_SETUP},
        "results": [r.to_dict() for r in results],
    }
