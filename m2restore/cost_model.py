"""A roofline cost model of one M2Restore forward: FLOPs and minimum bytes per component.

:func:`analyze` runs one forward of a model on *fake* tensors (``torch._subclasses.FakeTensorMode``:
shapes and dtypes only, no memory, no arithmetic, so ``paper()`` at 1024² costs seconds on any CPU)
under a dispatch mode that sees every operator, and attributes each one to the paper's component
running it (:func:`components`: DA-CLIP prior, TPGS, patch embed, each DDER, each level's
transformer blocks, downs and ups, the latent MCDBs split into Mamba mixer, selective scan, DGF and
the rest, each AFLB, refinement, output; what runs between components is "glue"). Per component:

* FLOPs, from the formulas ``torch.utils.flop_counter.FlopCounterMode`` applies (its registry):
  matmuls, convolutions, attention. Elementwise work is not counted there; it is bounded by bytes.
  The project's custom ops are registered in that registry here (:func:`register_flop_formulas`):
  ``moe_mlp`` (2·P·K·2·C·Hd), ``gated_fusion`` (the 1×1 gate GEMMs and the depthwise conv),
  ``selective_scan`` (per state element: exp, two products, multiply-add, the readout
  multiply-add), plus ``aten._native_multi_head_attention`` (the open_clip towers' inference path,
  which the stock registry leaves out). FLOPs are split into *tensor* (dense GEMM-like work, at the
  GPU's tensor-core peak of the run dtype) and *vector* (depthwise convolutions and the scan, at
  its FP32 peak).
* Minimum bytes: the component's inputs and outputs (once per call) plus the weights its operators
  read (once per forward), all floating tensors counted in the run dtype: what a single fused
  kernel per component would move through DRAM.
* Unfused bytes and launches: the bytes every dispatched operator reads and writes in its own dtype
  (views excluded) and their number: what eager execution moves and launches.

The lower bound of a component on a GPU is max(tensor/peak + vector/peak_fp32, bytes/bandwidth),
summed over components; launch overhead is not in it ("launch-free"). A component is flagged
*needs fusion* for a goal when its operator-by-operator bound exceeds its share of that goal,
the share being the goal split in proportion to the components' own lower bounds (the split under
which every component is equally far from its floor).
"""
from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, register_flop_formula

import m2restore_kernels  # noqa: F401 - registers the m2restore_kernels custom ops

from .config import M2RestoreConfig

MS = 1e-3
GOALS_MS = (5.0, 2.0)  # the GPU goals per 224² image: 5 ms, then 2 ms


@dataclass(frozen=True)
class GPU:
    """Data-sheet peaks, dense (no structured sparsity). FLOP/s and bytes/s."""

    name: str
    bf16: float  # tensor cores, 16-bit inputs, FP32 accumulate
    tf32: float  # tensor cores, TF32 (the bound used for float32 runs)
    fp32: float  # CUDA cores, no tensor cores
    bandwidth: float

    def tensor_peak(self, dtype: torch.dtype) -> float:
        return self.tf32 if dtype == torch.float32 else self.bf16


# NVIDIA H100 Tensor Core GPU datasheet, SXM5 column: BF16 1,979 and TF32 989 TFLOPS "with sparsity"
# (half dense), FP32 67 TFLOPS, HBM3 3.35 TB/s. NVIDIA H200 Tensor Core GPU datasheet, SXM column:
# the same compute, HBM3e 4.8 TB/s. NVIDIA Ampere GA102 GPU Architecture whitepaper, appendix A
# (GeForce RTX 3090): BF16 tensor with FP32 accumulate 71 TFLOPS, TF32 tensor 35.6 TFLOPS, FP32
# 35.6 TFLOPS, GDDR6X 936 GB/s.
GPUS = (
    GPU("H100 SXM", 989.5e12, 494.7e12, 66.9e12, 3.35e12),
    GPU("H200 SXM", 989.5e12, 494.7e12, 66.9e12, 4.8e12),
    GPU("RTX 3090", 71e12, 35.6e12, 35.6e12, 936e9),
)

# Operators that move no data (views, metadata, allocations): no bytes, no launch.
_FREE_OPS = {"_unsafe_view", "alias", "detach", "lift_fresh", "empty", "empty_like", "empty_strided",
             "new_empty", "new_empty_strided"}


# ----------------------------------------------------------------------------- FLOP formulas

def _moe_mlp_flop(x, weights, indices, w1, *args, out_shape=None, **kwargs) -> int:
    """x (P, C), indices (P, K), w1 (N, C, Hd): two GEMMs per (pixel, chosen expert)."""
    (p, c), k, hd = x, indices[1], w1[2]
    return 2 * p * k * (c * hd * 2)


def _gated_fusion_flop(y, mamba, prompt_bias, dw_weight, dw_bias, g1_weight, *args, out_shape=None, **kwargs) -> int:
    """y (B, C, H, W): per pixel the C×C gate GEMM, the C→1 gate and the 3×3 depthwise conv."""
    b, c, h, w = y
    return 2 * b * h * w * (c * c + c + 9 * c)


def scan_flops(b: int, d: int, l: int, n: int) -> int:
    """Selective scan (b, d, l) with n states: per state element exp(δA), δ·B·u (2), the
    recurrence h·a + bu (2) and the readout C·h summed (2); per channel step softplus, D·u and
    the SiLU(z) gate, counted as 8."""
    return b * d * l * (7 * n + 8)


def _selective_scan_flop(u, delta, A, *args, out_shape=None, **kwargs) -> int:
    b, d, l = u
    return scan_flops(b, d, l, A[1])


def _mha_flop(query, key, value, embed_dim, num_head, *args, out_shape=None, **kwargs) -> int:
    """Batch-first (B, L, E) self-attention: qkv projection, QKᵀ, AV, output projection."""
    b, l, e = query
    s = key[1]
    return 2 * b * l * e * 3 * e + 2 * 2 * b * l * s * e + 2 * b * l * e * e


#: Operators whose FLOPs run on CUDA cores (plus depthwise convolutions, see ``_flop_kind``).
_VECTOR_OPS = set()


def register_flop_formulas() -> None:
    """Add the custom ops' formulas to FlopCounterMode's registry (once per process)."""
    kernels = torch.ops.m2restore_kernels
    formulas = {kernels.moe_mlp: _moe_mlp_flop, kernels.gated_fusion: _gated_fusion_flop,
                kernels.selective_scan: _selective_scan_flop,
                torch.ops.aten._native_multi_head_attention: _mha_flop}
    for op, formula in formulas.items():
        if op not in flop_registry:
            register_flop_formula(op)(formula)
    _VECTOR_OPS.add(kernels.selective_scan)


register_flop_formulas()


def _flop_kind(packet, args) -> str:
    if packet in _VECTOR_OPS:
        return "vector"
    if packet is torch.ops.aten.convolution and len(args) > 8 and args[8] > 1:
        return "vector"  # grouped (depthwise) convolutions do not map onto tensor cores
    return "tensor"


# ----------------------------------------------------------------------------- components

@dataclass
class Component:
    """What one component of the network costs in one forward."""

    name: str
    calls: int = 0
    tensor_flops: int = 0
    vector_flops: int = 0
    min_bytes: int = 0  # fused: inputs + outputs + weights, run dtype
    unfused_bytes: int = 0  # every operator's inputs + outputs, own dtypes
    launches: int = 0

    @property
    def flops(self) -> int:
        return self.tensor_flops + self.vector_flops

    def compute_s(self, gpu: GPU, dtype: torch.dtype) -> float:
        return self.tensor_flops / gpu.tensor_peak(dtype) + self.vector_flops / gpu.fp32

    def bound_s(self, gpu: GPU, dtype: torch.dtype) -> float:
        """Lower bound with every byte moved once (one fused kernel per component)."""
        return max(self.compute_s(gpu, dtype), self.min_bytes / gpu.bandwidth)

    def unfused_s(self, gpu: GPU, dtype: torch.dtype) -> float:
        """Lower bound with one kernel per operator, each reading and writing DRAM."""
        return max(self.compute_s(gpu, dtype), self.unfused_bytes / gpu.bandwidth)


def components(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """The paper's components of an ``M2Restore`` in forward order, each with the modules that make
    it up. Modules may nest (an MCDB holds its Mamba mixer and DGF): an operator belongs to the
    innermost one."""
    groups: list[tuple[str, list[nn.Module]]] = []
    if isinstance(model.prior, nn.Module):
        groups.append(("DA-CLIP prior", [model.prior]))
    groups += [("TPGS task prompt", [model.task_prompt]), ("patch embed", [model.patch_embed])]
    for level, enc in enumerate(model.encoder, 1):
        groups += [(f"DDER {level}", [enc.dder]), (f"encoder blocks L{level}", [enc.blocks]),
                   (f"down {level}", [enc.down])]
    n = len(model.latent)
    groups += [
        (f"MCDB x{n}: norms, GDFN, residuals", list(model.latent)),
        (f"MCDB x{n}: Mamba mixer (proj, conv)", [m.mamba for m in model.latent]),
        (f"MCDB x{n}: DGF", [m.dgf for m in model.latent]),
    ]
    for level in (3, 2, 1):
        dec = model.decoder[level - 1]
        groups += [(f"AFLB {level}", [dec.aflb]), (f"up {level}", [dec.up])]
        if not isinstance(dec.reduce, nn.Identity):
            groups.append((f"reduce {level}", [dec.reduce]))
        groups.append((f"decoder blocks L{level}", [dec.blocks]))
    groups += [("refinement", [model.refinement]), ("output conv", [model.output])]
    return groups


#: The selective scan is a component of its own wherever it runs; glue is what runs outside all.
SCAN = "MCDB x{n}: selective scan"
GLUE = "glue (pad, concat, reshapes)"


# ----------------------------------------------------------------------------- the counting

def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _nbytes(t: torch.Tensor, dtype: torch.dtype | None) -> int:
    """Bytes of ``t``'s elements, floating ones in ``dtype`` if given (else their own)."""
    size = dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size()
    return t.numel() * size


class _Counter(TorchDispatchMode):
    """Attributes every dispatched operator to the innermost active component."""

    def __init__(self, dtype: torch.dtype, weight_storages: set[int], scan_name: str):
        super().__init__()
        self.dtype = dtype
        self.weights = weight_storages
        self.scan_name = scan_name
        self.stack: list[Component] = []
        self.glue = Component(GLUE)
        self.scan = Component(scan_name)
        self.weights_seen: dict[str, set[int]] = defaultdict(set)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if getattr(func, "namespace", None) == "prim" or func.is_view or func._opname in _FREE_OPS:
            return out
        packet = func.overloadpacket
        comp = self.stack[-1] if self.stack else self.glue
        if packet is torch.ops.m2restore_kernels.selective_scan:
            comp = self.scan
            comp.calls += 1
        ins, outs = _tensors((args, kwargs)), _tensors(out)
        if packet in flop_registry:
            flops = flop_registry[packet](*args, **kwargs, out_val=out)
            kind = _flop_kind(packet, args)
            if kind == "tensor":
                comp.tensor_flops += flops
            else:
                comp.vector_flops += flops
        comp.launches += 1
        comp.unfused_bytes += sum(_nbytes(t, None) for t in {id(t): t for t in ins + outs}.values())
        seen = self.weights_seen[comp.name]
        for t in ins:
            key = _storage_key(t)
            if key in self.weights and key not in seen:
                seen.add(key)
                comp.min_bytes += t.untyped_storage().nbytes() // t.element_size() * (
                    self.dtype.itemsize if t.is_floating_point() else t.element_size())
        if comp is self.scan:  # a component of one operator: its own inputs and outputs
            comp.min_bytes += sum(_nbytes(t, self.dtype) for t in {id(t): t for t in ins + outs}.values())
        return out


@dataclass
class CostReport:
    """The cost of one forward: components in forward order, then the scan and the glue."""

    title: str
    dtype: torch.dtype
    components: list[Component] = field(default_factory=list)

    @property
    def total(self) -> Component:
        total = Component("total")
        for c in self.components:
            for f in ("calls", "tensor_flops", "vector_flops", "min_bytes", "unfused_bytes", "launches"):
                setattr(total, f, getattr(total, f) + getattr(c, f))
        return total

    def bound_s(self, gpu: GPU) -> float:
        """Launch-free lower bound of the whole forward: the components' bounds summed."""
        return sum(c.bound_s(gpu, self.dtype) for c in self.components)

    def unfused_s(self, gpu: GPU) -> float:
        return sum(c.unfused_s(gpu, self.dtype) for c in self.components)

    def needs_fusion(self, comp: Component, gpu: GPU, goal_s: float) -> bool:
        """Whether ``comp`` run operator by operator exceeds its share of ``goal_s`` on ``gpu``."""
        total = self.bound_s(gpu)
        share = goal_s * comp.bound_s(gpu, self.dtype) / total if total else goal_s
        return comp.unfused_s(gpu, self.dtype) > share

    def component(self, name: str) -> Component:
        return next(c for c in self.components if c.name == name)


def analyze(model: nn.Module, size: int | tuple[int, int], dtype: torch.dtype = torch.bfloat16,
            batch: int = 1, title: str | None = None) -> CostReport:
    """Cost one forward of ``model`` (an ``M2Restore`` whose parameters are fake CPU tensors, see
    :func:`fake_model`) on a (batch, 3, H, W) image, under autocast to ``dtype`` unless float32."""
    h, w = (size, size) if isinstance(size, int) else size
    params = list(model.parameters()) + list(model.buffers())
    if isinstance(model.prior, nn.Module):
        params += list(model.prior.parameters()) + list(model.prior.buffers())
    fake_mode = getattr(params[0], "fake_mode", None) if params else None
    if fake_mode is None:
        raise ValueError("analyze needs a model of fake tensors: build it with cost_model.fake_model")
    groups = components(model)
    counter = _Counter(dtype, {_storage_key(p) for p in params},
                       SCAN.format(n=len(getattr(model, "latent", ()))))
    comps = {name: Component(name) for name, _ in groups}
    handles = []

    def enter(comp):
        def hook(module, args, kwargs):
            comp.calls += 1
            comp.min_bytes += sum(_nbytes(t, dtype) for t in {id(t): t for t in _tensors((args, kwargs))}.values())
            counter.stack.append(comp)
        return hook

    def leave(comp):
        def hook(module, args, kwargs, output):
            counter.stack.pop()
            comp.min_bytes += sum(_nbytes(t, dtype) for t in {id(t): t for t in _tensors(output)}.values())
        return hook

    for name, modules in groups:
        for m in modules:
            handles.append(m.register_forward_pre_hook(enter(comps[name]), with_kwargs=True))
            handles.append(m.register_forward_hook(leave(comps[name]), with_kwargs=True))
    try:
        with fake_mode, torch.no_grad():
            x = torch.rand(batch, 3, h, w)
            if hasattr(model.prior, "text_features"):
                model.prior.text_features()  # computed once per model, not per image
            autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
            with counter, autocast:
                model(x)
    finally:
        for handle in handles:
            handle.remove()
    ordered = [comps[name] for name, _ in groups]
    scan_at = next((i for i, (name, _) in enumerate(groups) if "Mamba mixer" in name), len(ordered) - 1)
    ordered.insert(scan_at + 1, counter.scan)
    counter.glue.min_bytes = 0  # glue is assumed fused into its neighbours' kernels
    ordered.append(counter.glue)
    return CostReport(title or f"{h}x{w}, batch {batch}, {_dtype_name(dtype)}",
                      dtype, [c for c in ordered if c.calls or c.launches])


def fake_model(config: M2RestoreConfig, prior: str = "daclip"):
    """``M2Restore(config)`` with fake parameters (no memory), ready for :func:`analyze`.

    ``prior``: ``"daclip"`` for the random-weight DA-CLIP ViT-B/32 of ``m2restore bench`` (needs
    open_clip), ``"none"`` for the null prior. The backend is "torch", so the custom ops run as
    single nodes whatever the config says.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .model import M2Restore
    from .prior.null import NullPrior

    config = dataclasses.replace(config, backend="torch")
    with torch.device("meta"):
        if prior == "daclip":
            from .prior import DAClipPrior

            prior_module = DAClipPrior(model_name="ViT-B-32", names=config.degradation_names)
        elif prior == "none":
            prior_module = NullPrior(config.num_degradations, config.prior_dim)
        else:
            raise ValueError(f"prior must be 'daclip' or 'none', got {prior!r}")
        model = M2Restore(config, prior=prior_module).eval()
    # Meta tensors cannot run under autocast; fake CPU tensors can, and cost nothing either.
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
    return model


def measure_components(model: nn.Module, x: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                       rounds: int = 3) -> dict[str, float]:
    """Measured ms of each component of ``model`` (real tensors, on ``x``'s device) in eager
    forwards under autocast to ``dtype``: the median over ``rounds`` of the time while each
    component is the innermost one running (the selective scan counts in its Mamba mixer; "glue"
    is the time inside the forward outside every component). On CUDA the boundaries are events on
    the current stream, so launch gaps count where they occur; on a CPU, wall-clock time."""
    cuda = x.device.type == "cuda"
    glue = Component(GLUE)
    stack: list[Component] = []
    marks: list[tuple[object, Component | None]] = []  # (clock, component running after it)

    def mark():
        if cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def push(comp):
        def hook(*_):
            stack.append(comp)
            marks.append((mark(), comp))
        return hook

    def pop(*_):
        stack.pop()
        marks.append((mark(), stack[-1] if stack else None))

    groups = [(GLUE, [model])] + components(model)
    comps = {name: (glue if name == GLUE else Component(name)) for name, _ in groups}
    handles = []
    for name, modules in groups:
        for m in modules:
            handles += [m.register_forward_pre_hook(push(comps[name])), m.register_forward_hook(pop)]
    per_round: dict[str, list[float]] = defaultdict(list)
    try:
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            model(x)  # warm-up: kernels compiled, caches filled
            for _ in range(rounds):
                marks.clear()
                model(x)
                if cuda:
                    torch.cuda.synchronize(x.device)
                spent: dict[str, float] = defaultdict(float)
                for (t0, comp), (t1, _) in zip(marks, marks[1:]):
                    if comp is not None:
                        spent[comp.name] += t0.elapsed_time(t1) if cuda else (t1 - t0) * 1e3
                for name, value in spent.items():
                    per_round[name].append(value)
    finally:
        for handle in handles:
            handle.remove()
    return {name: sorted(v)[len(v) // 2] for name, v in per_round.items()}


# ----------------------------------------------------------------------------- the table

def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def format_report(report: CostReport, gpus: Sequence[GPU] = GPUS, goals_ms: Iterable[float] = GOALS_MS,
                  measured_ms: dict[str, float] | None = None, markdown: bool = False,
                  component_ms: dict[str, float] | None = None) -> str:
    """The table of ``report``: per component FLOPs, bytes, launches, the lower bound on each GPU
    (fused, and operator by operator), the goals it needs fusion for; then the totals and, if
    ``measured_ms`` maps case labels to measured ms per image, those beside the bounds.
    ``component_ms`` (from :func:`measure_components`) adds a measured column per component."""
    goals = list(goals_ms)
    head = ["component", "GFLOP", "tensor %", "min MB", "eager MB", "launches"]
    head += [f"{g.name} µs" for g in gpus] + [f"{gpus[0].name} eager µs", "needs fusion for"]
    if component_ms is not None:
        head.append("measured µs")
    rows = []
    for c in report.components + [report.total]:
        total = c.name == "total"
        flags = [f"{g:g} ms" for g in goals if not total and report.needs_fusion(c, gpus[0], g * MS)]
        bounds = ([report.bound_s(g) for g in gpus] if total else [c.bound_s(g, report.dtype) for g in gpus])
        eager = report.unfused_s(gpus[0]) if total else c.unfused_s(gpus[0], report.dtype)
        rows.append([c.name, f"{c.flops / 1e9:.2f}", f"{100 * c.tensor_flops / c.flops:.0f}" if c.flops else "-",
                     f"{c.min_bytes / 1e6:.1f}", f"{c.unfused_bytes / 1e6:.1f}", str(c.launches)]
                    + [f"{b * 1e6:.1f}" for b in bounds] + [f"{eager * 1e6:.1f}", ", ".join(flags) or "-"])
        if component_ms is not None:
            value = sum(component_ms.values()) if total else component_ms.get(c.name)
            rows[-1].append(f"{value * 1e3:.1f}" if value is not None else "-")
    lines = [f"roofline lower bound of one forward: {report.title} (bounds computed from shapes, not measured)"]
    if markdown:
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        fmt = lambda r: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
        lines += [fmt(head), "-" * (sum(widths) + 2 * len(widths))] + [fmt(r) for r in rows]
    total = report.total
    lines.append("")
    for g in gpus:
        lines.append(
            f"lower bound on {g.name}: {report.bound_s(g) * 1e3:.3f} ms launch-free, fused per component "
            f"({_si(total.flops, 'FLOP')}, {_si(total.min_bytes, 'B')}); operator by operator "
            f"{report.unfused_s(g) * 1e3:.3f} ms ({_si(total.unfused_bytes, 'B')}, {total.launches} launches)")
    for g in goals:
        lines.append(f"at {g:g} ms per image, {total.launches} launches leave {g * 1e3 / max(total.launches, 1):.2f} µs "
                     f"per launch for launch overhead and work together")
    if measured_ms:
        bound = report.bound_s(gpus[0]) * 1e3
        for label, value in measured_ms.items():
            lines.append(f"measured on this run's machine, {label}: {value:.2f} ms per image "
                         f"({value / bound:.0f}x the {gpus[0].name} bound)")
    lines += [
        f"{gpus[0].name} eager µs: every operator reads and writes DRAM (its own dtype); needs fusion for G: that "
        f"bound exceeds the component's share of G on the {gpus[0].name} (G split in proportion to the fused bounds)",
        "peaks (dense, data sheets): " + "; ".join(
            f"{g.name} {g.bf16 / 1e12:.0f} TFLOP/s bf16, {g.tf32 / 1e12:.0f} tf32, {g.fp32 / 1e12:.1f} fp32, "
            f"{g.bandwidth / 1e12:.2f} TB/s" for g in gpus),
    ]
    return "\n".join(lines)


def roofline_table(config: M2RestoreConfig, size: int, dtype: str = "bf16", prior: bool = True,
                   measured_ms: dict[str, float] | None = None, markdown: bool = False,
                   component_ms: dict[str, float] | None = None) -> str:
    """The printable roofline table of ``config`` at ``size``² batch 1 in ``dtype`` ("fp32",
    "bf16", "fp16"), with the DA-CLIP prior if ``prior``; ``measured_ms`` and ``component_ms`` as
    :func:`format_report`."""
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {tuple(dtypes)}, got {dtype!r}")
    model = fake_model(config, "daclip" if prior else "none")
    report = analyze(model, size, dtypes[dtype],
                     title=f"{size}x{size}, batch 1, {dtype}, prior {'DA-CLIP' if prior else 'off'}")
    return format_report(report, measured_ms=measured_ms, markdown=markdown, component_ms=component_ms)


def roofline_tables(config: M2RestoreConfig, measured: Iterable[dict]) -> str:
    """One roofline table per (size, dtype, prior) among ``measured``, each with the measured ms
    per image of its cases beside the bounds. ``measured``: dicts with ``size``, ``dtype``,
    ``prior``, ``label`` and ``ms_per_image`` (None for a case that failed), as
    ``m2restore bench`` writes them."""
    keys: dict[tuple[int, str, bool], dict[str, float]] = {}
    for m in measured:
        cases = keys.setdefault((m["size"], m["dtype"], m["prior"]), {})
        if m.get("ms_per_image"):
            cases[f"{m['label']} {m['dtype']}"] = m["ms_per_image"]
    return "\n\n".join(roofline_table(config, size, dtype, prior, measured_ms=times or None)
                       for (size, dtype, prior), times in keys.items())
