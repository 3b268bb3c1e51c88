"""mamba-ssm's unchanged ``Mamba2`` after ``apply_to_mamba_ssm()``, against mamba-ssm's own
pure-PyTorch pieces (``ssd_minimal_discrete``, the gated ``rms_norm_ref``) in float64, and its
cached generation against recomputing the whole sequence."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import m2restore_kernels
from m2restore_kernels._backend import DISABLE_ENV

from test_mamba_ssm_dropin import HIDE_UPSTREAM, needs_upstream, run_python


@pytest.fixture(autouse=True)
def cpu_user(monkeypatch):
    """The C loops, as a user's CPU process runs them (the Triton kernels have their own tests)."""
    monkeypatch.setenv(DISABLE_ENV, "triton")
    m2restore_kernels.apply_to_mamba_ssm()


def _mamba2(**kw):
    from mamba_ssm.modules.mamba2 import Mamba2

    torch.manual_seed(0)
    layer = Mamba2(d_model=48, d_state=8, headdim=12, ngroups=2, chunk_size=8, **kw)
    with torch.no_grad():  # out of the init's small range, so every part of the block matters
        layer.dt_bias.normal_(0.0, 0.5)
        layer.norm.weight.normal_(1.0, 0.3)
    return layer


def mamba2_float64(layer, u):
    """Mamba2's forward from its parameters in float64, with mamba-ssm's own PyTorch references for
    the scan (``ssd_minimal_discrete``: the paper's chunked listing) and the gated norm."""
    from mamba_ssm.modules.ssd_minimal import ssd_minimal_discrete
    from mamba_ssm.ops.triton.layernorm_gated import rms_norm_ref

    p = {name: t.double() for name, t in layer.named_parameters()}
    batch, seqlen, _ = u.shape
    nheads, headdim, ngroups, dstate = layer.nheads, layer.headdim, layer.ngroups, layer.d_state
    dim = nheads * headdim
    zxbcdt = F.linear(u.double(), p["in_proj.weight"])
    z, xBC, dt = torch.split(zxbcdt, [dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
    xBC = F.silu(F.conv1d(xBC.transpose(1, 2), p["conv1d.weight"], p["conv1d.bias"], padding=layer.d_conv - 1,
                          groups=xBC.shape[-1])[..., :seqlen]).transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    dt = F.softplus(dt + p["dt_bias"])
    heads = nheads // ngroups
    per_head = lambda t: t.unflatten(-1, (ngroups, dstate)).repeat_interleave(heads, dim=2)  # noqa: E731
    x = x.unflatten(-1, (nheads, headdim))
    A = -torch.exp(p["A_log"])
    y, _ = ssd_minimal_discrete(x * dt[..., None], A * dt, per_head(B), per_head(C), block_len=seqlen)
    y = (y + p["D"][:, None] * x).flatten(-2)
    y = rms_norm_ref(y, p["norm.weight"], None, z=z, eps=layer.norm.eps, group_size=dim // ngroups,
                     norm_before_gate=False)
    return F.linear(y, p["out_proj.weight"])


@needs_upstream
@pytest.mark.parametrize("mem_eff", [True, False], ids=["fused-block-op", "chunk-scan-path"])
def test_mamba2_forward_and_backward_match_mamba_ssm_references(mem_eff):
    """Both of Mamba2's forward paths (``use_mem_eff_path``: ``mamba_split_conv1d_scan_combined``;
    else ``causal_conv1d_fn`` + ``mamba_chunk_scan_combined`` + RMSNormGated)."""
    layer = _mamba2(use_mem_eff_path=mem_eff)
    u = torch.randn(2, 24, 48, generator=torch.Generator().manual_seed(1), requires_grad=True)
    ref_layer = copy.deepcopy(layer).double()
    u_ref = u.detach().double().requires_grad_()
    out, want = layer(u), mamba2_float64(ref_layer, u_ref)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = torch.autograd.grad((out.double() * w).sum(), [u, *layer.parameters()])
    ref = torch.autograd.grad((want * w).sum(), [u_ref, *ref_layer.parameters()])
    names = ["u"] + [name for name, _ in layer.named_parameters()]
    for name, a, b in zip(names, got, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-4, msg=lambda m: f"d{name}: {m}")


@needs_upstream
def test_mamba2_language_model_generates_what_recomputing_the_sequence_gives():
    """MambaLMHeadModel with Mamba2 layers: ``generate()`` (the prompt through the chunk scan with
    final states, then one ``step`` per token: causal_conv1d_update and the multi-head
    selective_state_update) gives the tokens and logits of rerunning the whole sequence each time."""
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    torch.manual_seed(0)
    config = MambaConfig(d_model=48, n_layer=2, vocab_size=61, pad_vocab_size_multiple=1,
                         ssm_cfg=dict(layer="Mamba2", d_state=8, headdim=12, ngroups=2, chunk_size=8))
    model = MambaLMHeadModel(config).eval()
    prompt = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model.generate(prompt, max_length=17, output_scores=True, return_dict_in_generate=True,
                             cg=False, top_k=1)
        tokens = out.sequences
        assert tokens.shape == (2, 17)
        full = model(tokens[:, :-1]).logits[:, prompt.shape[1] - 1:]
    assert torch.equal(tokens[:, prompt.shape[1]:], full.argmax(-1))
    torch.testing.assert_close(torch.stack(out.scores, 1), full, rtol=1e-4, atol=1e-4)


def test_mamba2_ops_stand_in_without_mamba_ssm():
    """Client code importing Mamba-2's ops from mamba_ssm's module paths runs with neither package
    installed."""
    out = run_python(HIDE_UPSTREAM + """
import torch, m2restore_kernels
m2restore_kernels.apply_to_mamba_ssm()
from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
from mamba_ssm.ops.triton.layernorm_gated import RMSNorm
x, dt, A = torch.randn(1, 6, 2, 4), torch.rand(1, 6, 2), -torch.rand(2)
B = C = torch.randn(1, 6, 1, 3)
y = mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size=4)
print(tuple(y.shape), tuple(RMSNorm(8, group_size=4)(torch.randn(3, 8), torch.randn(3, 8)).shape))
""")
    assert out.split() == ["(1,", "6,", "2,", "4)", "(3,", "8)"]


@needs_upstream
def test_mamba2_compiles_whole():
    """torch.compile(fullgraph=True) keeps the fused block op's path whole (our ops are custom ops
    or traceable PyTorch) and gives eager's output."""
    layer = _mamba2()
    u = torch.randn(2, 16, 48, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(u), layer(u), rtol=1e-5, atol=1e-5)


@needs_upstream
def test_mamba2_agrees_with_transformers_mamba2_mixer():
    """A third implementation: transformers' ``Mamba2Mixer`` (its PyTorch chunked SSD, what it runs
    without hub kernels) with the same weights gives our ``Mamba2``'s output and input gradient."""
    transformers = pytest.importorskip("transformers")
    layer = _mamba2(use_mem_eff_path=False)
    config = transformers.Mamba2Config(hidden_size=48, state_size=8, head_dim=12, num_heads=8, n_groups=2, expand=2,
                                       conv_kernel=4, chunk_size=8, use_bias=False, use_conv_bias=True,
                                       layer_norm_epsilon=layer.norm.eps, num_hidden_layers=1)
    mixer = transformers.models.mamba2.modeling_mamba2.Mamba2Mixer(config, layer_idx=0)
    mixer.load_state_dict(layer.state_dict())
    u = torch.randn(2, 24, 48, generator=torch.Generator().manual_seed(6), requires_grad=True)
    ours, theirs = layer(u), mixer(u)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    (g_ours,) = torch.autograd.grad(ours.square().sum(), u)
    (g_theirs,) = torch.autograd.grad(theirs.square().sum(), u)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-4, atol=1e-5)
