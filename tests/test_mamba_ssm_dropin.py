"""``apply_to_mamba_ssm()``: mamba-ssm's and causal-conv1d's own, unchanged models run our kernels.

Two settings:

* neither package installed (simulated in a subprocess that hides them from the import system):
  client code importing ``mamba_ssm.ops.selective_scan_interface``, ``mamba_ssm.ops.triton.
  selective_state_update`` and ``causal_conv1d`` the way MambaIR and VMamba do imports and runs.
* the registry's packages installed without their CUDA extensions (``.ci/run`` installs them; the
  rest of the file skips when they are absent): ``Mamba`` on its default fast path, ``MambaLMHeadModel``
  forward, backward and ``generate()``, and a VMamba-style 2-D scan block, each against mamba-ssm's
  own PyTorch reference path (``mamba_ssm_reference_path``); torch.compile(fullgraph=True) of each.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
import types

import pytest
import torch

import m2restore_kernels
from m2restore_kernels._backend import DISABLE_ENV, optional_op
from m2restore_kernels.integrations import mamba_ssm as integration
from m2restore_kernels.testing import relative_error

# float32 models against mamba-ssm's float32 reference path: both sum in float32, in different
# orders, through a few layers (measured: <= 3e-7 forward, <= 2e-6 gradients).
TOL = 1e-5
HIDE_UPSTREAM = textwrap.dedent("""
    import importlib.machinery, sys
    HIDDEN = {"mamba_ssm", "causal_conv1d", "selective_scan_cuda", "causal_conv1d_cuda"}

    class NotInstalled(importlib.machinery.PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            return None if name.split(".")[0] in HIDDEN else super().find_spec(name, path, target)

    sys.meta_path = [NotInstalled if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
""")


@pytest.fixture(autouse=True)
def cpu_user(monkeypatch):
    """CPU tensors run what a user's process runs on a CPU, the C loop (the Triton kernels, which
    the root conftest's interpreter would run here, have their own tests)."""
    monkeypatch.setenv(DISABLE_ENV, "triton")


def run_python(code: str):
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_stand_ins_serve_client_imports_without_upstream():
    out = run_python(HIDE_UPSTREAM + textwrap.dedent("""
        import importlib.util, torch
        import m2restore_kernels
        assert importlib.util.find_spec("mamba_ssm") is None
        summary = m2restore_kernels.apply_to_mamba_ssm()
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn, selective_scan_ref
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
        from mamba_ssm.ops.triton.layer_norm import RMSNorm
        g = torch.Generator().manual_seed(0)
        b, d, l, n = 2, 6, 33, 4
        u, z = torch.randn(b, d, l, generator=g), torch.randn(b, d, l, generator=g)
        delta = 0.5 * torch.rand(b, d, l, generator=g)
        A, B, C = -torch.rand(d, n, generator=g), torch.randn(b, n, l, generator=g), torch.randn(b, n, l, generator=g)
        out = selective_scan_fn(u, delta, A, B, C, torch.ones(d), z, None, True)
        want = selective_scan_ref(*(t.double() for t in (u, delta, A, B, C, torch.ones(d), z)), None, True)
        err_scan = ((out.double() - want).norm() / want.norm()).item()
        w, bias = torch.randn(d, 4, generator=g), torch.randn(d, generator=g)
        conv = causal_conv1d_fn(u, w, bias, activation="silu")
        xp = torch.nn.functional.pad(u.double(), (3, 0))
        conv_want = sum(xp[..., k:k + l] * w.double()[:, k, None] for k in range(4)) + bias.double()[:, None]
        conv_want = conv_want * torch.sigmoid(conv_want)
        err_conv = ((conv.double() - conv_want).norm() / conv_want.norm()).item()
        state = xp[..., -4:].float().clone()
        step = causal_conv1d_update(torch.randn(b, d, generator=g), state, w, bias, "silu")
        try:
            from mamba_ssm import Mamba
            imported = True
        except ImportError:
            imported = False
        import mamba_ssm
        try:
            mamba_ssm.Mamba
        except AttributeError as error:
            print("attribute-error:", error)
        print(summary["stand_in_packages"], err_scan, err_conv, tuple(step.shape), imported, RMSNorm(d)(u.mT).shape)
    """))
    last = out.strip().splitlines()[-1]
    packages, rest = last.split("] ")
    err_scan, err_conv, *tail = rest.split(" ", 2)
    assert packages == "['causal_conv1d', 'mamba_ssm'"
    assert float(err_scan) <= TOL and float(err_conv) <= TOL
    assert tail[0].startswith("(2, 6) False")  # the decode step ran; Mamba itself is not a stand-in
    assert "mamba_ssm is not installed" in out


def test_dispatcher_keeps_upstream_for_cuda_tensors():
    """Routing on the device of the first argument: CUDA -> upstream's function where it runs, and
    ours when it does not or when the user disables extensions (no GPU needed: a stand-in tensor)."""
    calls = []

    def upstream(x, weight, bias=None, activation=None):
        calls.append("upstream")
        return "upstream"

    cuda_like = types.SimpleNamespace(device=torch.device("cuda"))
    runs = integration._dispatcher("causal_conv1d_fn", upstream, upstream_runs_on_cuda=True)
    assert runs(cuda_like, None, activation="silu") == "upstream"
    assert getattr(runs, integration.UPSTREAM_ATTR) is upstream
    missing = integration._dispatcher("causal_conv1d_fn", upstream, upstream_runs_on_cuda=False)
    assert getattr(missing, integration.UPSTREAM_ATTR) is None
    x, w = torch.randn(1, 2, 5), torch.randn(2, 3)
    assert torch.equal(missing(x, w), m2restore_kernels.causal_conv1d_fn(x, w))  # CPU: ours
    assert calls == ["upstream"]


def test_norm_flags_we_do_not_implement_raise():
    x, w = torch.randn(2, 8), torch.ones(8)
    for kwargs, name in (({"dropout_p": 0.1}, "dropout_p"), ({"x1": x}, "x1"), ({"rowscale": x[:, 0]}, "rowscale")):
        with pytest.raises(ValueError, match=name):
            integration.layer_norm_fn(x, w, None, **kwargs)
    out, residual = integration.rms_norm_fn(x, w, None, residual=x, prenorm=True, residual_in_fp32=True)
    h = 2 * x.double()
    assert relative_error(out, h / h.square().mean(-1, keepdim=True).add(1e-6).sqrt()) <= TOL
    assert residual.dtype == torch.float32 and torch.equal(residual, 2 * x)


# --------------------------------------------------------------------------------------------
# The registry's mamba-ssm and causal-conv1d, without their CUDA builds
# --------------------------------------------------------------------------------------------
needs_upstream = pytest.mark.skipif(
    importlib.util.find_spec("mamba_ssm") is None or importlib.util.find_spec("causal_conv1d") is None,
    reason="mamba-ssm / causal-conv1d not installed (.ci/run installs them with their CUDA builds skipped)")


@pytest.fixture(scope="module")
def upstream():
    summary = m2restore_kernels.apply_to_mamba_ssm()
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from mamba_ssm.modules.mamba_simple import Mamba
    return types.SimpleNamespace(summary=summary, Mamba=Mamba, MambaLMHeadModel=MambaLMHeadModel,
                                 MambaConfig=MambaConfig)


def grads(model):
    return {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def forward_backward(model, x):
    model.zero_grad()
    out = model(x)
    out = out.logits if hasattr(out, "logits") else out
    (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), grads(model)


def assert_same_run(ours, ref):
    (out, g), (out_ref, g_ref) = ours, ref
    assert relative_error(out, out_ref) <= TOL
    assert g.keys() == g_ref.keys() and g
    for name in g:
        assert relative_error(g[name], g_ref[name]) <= TOL, name


@needs_upstream
def test_every_name_mamba_forward_and_step_reach_dispatches(upstream):
    import causal_conv1d
    from mamba_ssm.models import mixer_seq_simple
    from mamba_ssm.modules import mamba_simple
    from mamba_ssm.ops import selective_scan_interface as ssi

    block = sys.modules.get("mamba_ssm.modules.block", mamba_simple)  # 1.x: Block lives in mamba_simple
    layer_norm = integration._first_module(integration.NORM_MODULES)

    bound = {mamba_simple: ("selective_scan_fn", "mamba_inner_fn", "causal_conv1d_fn", "causal_conv1d_update",
                            "selective_state_update", "layer_norm_fn", "rms_norm_fn"),
             ssi: ("selective_scan_fn", "mamba_inner_fn"), causal_conv1d: ("causal_conv1d_fn", "causal_conv1d_update"),
             block: ("layer_norm_fn",), mixer_seq_simple: ("layer_norm_fn", "rms_norm_fn"),
             layer_norm: ("layer_norm_fn", "rms_norm_fn")}
    for module, names in bound.items():
        for name in names:
            assert hasattr(getattr(module, name), integration.UPSTREAM_ATTR), f"{module.__name__}.{name}"
    # No CUDA extension here: our own backend never takes a dispatcher for the extension.
    optional_op.cache_clear()
    assert optional_op("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn") is None
    assert optional_op("causal_conv1d", "causal_conv1d_fn") is None
    assert m2restore_kernels.apply_to_mamba_ssm()["rebound"] == []  # idempotent


@needs_upstream
def test_mamba_block_default_fast_path_matches_reference_path(upstream):
    torch.manual_seed(0)
    model = upstream.Mamba(d_model=16, d_state=8, layer_idx=0)
    assert model.use_fast_path
    x = torch.randn(2, 48, 16, requires_grad=True)
    ours = forward_backward(model, x)
    with integration.mamba_ssm_reference_path(model):
        ref = forward_backward(model, x)
    assert_same_run(ours, ref)


def small_lm(upstream):
    torch.manual_seed(0)
    config = upstream.MambaConfig(d_model=32, n_layer=2, vocab_size=64, ssm_cfg={},
                                  rms_norm=True, fused_add_norm=True, residual_in_fp32=True, pad_vocab_size_multiple=8)
    return upstream.MambaLMHeadModel(config)


@needs_upstream
def test_lm_forward_backward_and_generate_match_reference_path(upstream):
    model = small_lm(upstream)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    ours = forward_backward(model, ids)
    with integration.mamba_ssm_reference_path(model):
        ref = forward_backward(model, ids)
    assert_same_run(ours, ref)

    model.eval()
    kwargs = dict(max_length=ids.shape[1] + 12, output_scores=True, return_dict_in_generate=True)
    gen = model.generate(ids, **kwargs)
    with integration.mamba_ssm_reference_path(model):
        gen_ref = model.generate(ids, **kwargs)
    assert torch.equal(gen.sequences, gen_ref.sequences)
    assert relative_error(torch.stack(gen.scores), torch.stack(gen_ref.scores)) <= TOL


def cross_scan_block(x, x_proj_weight, dt_proj_weight, dt_bias, A_logs, Ds):
    """VMamba's SS2D core as VMamba and MambaIR write it: the (b, d, h, w) map scanned in four
    directions (rows, columns, and both reversed), each direction k with its own x_proj / dt_proj,
    B and C grouped per direction (b, 4, n, l), through mamba_ssm's ``selective_scan_fn``."""
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    b, d, h, w = x.shape
    l, k = h * w, 4
    n = A_logs.shape[1]
    rows = torch.stack([x.reshape(b, d, l), x.transpose(2, 3).reshape(b, d, l)], dim=1)
    xs = torch.cat([rows, rows.flip(-1)], dim=1)                                     # (b, 4, d, l)
    x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, x_proj_weight)
    dts, Bs, Cs = torch.split(x_dbl, [dt_proj_weight.shape[2], n, n], dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", dts, dt_proj_weight)
    out = selective_scan_fn(xs.reshape(b, k * d, l), dts.reshape(b, k * d, l), -torch.exp(A_logs), Bs, Cs,
                            Ds, z=None, delta_bias=dt_bias, delta_softplus=True).view(b, k, d, l)
    flipped = out[:, 2:].flip(-1)
    def cols(t):
        return t.view(b, d, w, h).transpose(2, 3).reshape(b, d, l)
    return (out[:, 0] + flipped[:, 0] + cols(out[:, 1]) + cols(flipped[:, 1])).view(b, d, h, w)


class CrossScanModel(torch.nn.Module):
    def __init__(self, d=8, n=4, rank=2):
        super().__init__()
        k = 4
        self.x_proj_weight = torch.nn.Parameter(0.3 * torch.randn(k, rank + 2 * n, d))
        self.dt_proj_weight = torch.nn.Parameter(0.3 * torch.randn(k, d, rank))
        self.dt_bias = torch.nn.Parameter(0.1 * torch.randn(k * d))
        self.A_logs = torch.nn.Parameter(torch.log(torch.arange(1, n + 1.0)).repeat(k * d, 1))
        self.Ds = torch.nn.Parameter(torch.ones(k * d))

    def forward(self, x):
        return cross_scan_block(x, self.x_proj_weight, self.dt_proj_weight, self.dt_bias, self.A_logs, self.Ds)


@needs_upstream
def test_vmamba_style_cross_scan_matches_reference_path(upstream):
    torch.manual_seed(0)
    model = CrossScanModel()
    x = torch.randn(2, 8, 6, 5, requires_grad=True)
    ours = forward_backward(model, x)
    with integration.mamba_ssm_reference_path():
        ref = forward_backward(model, x)
    assert_same_run(ours, ref)


@needs_upstream
@pytest.mark.parametrize("what", ["mamba_fast_path", "lm", "cross_scan"])
def test_compile_fullgraph_keeps_every_path(upstream, what):
    torch.manual_seed(0)
    if what == "mamba_fast_path":
        model, x = upstream.Mamba(d_model=16, d_state=8, layer_idx=0), torch.randn(1, 16, 16)
    elif what == "lm":
        model, x = small_lm(upstream), torch.randint(0, 64, (1, 16))
    else:
        model, x = CrossScanModel(), torch.randn(1, 8, 4, 4)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    want, got = forward_backward(model, x), forward_backward(compiled, x)
    assert_same_run(got, want)
