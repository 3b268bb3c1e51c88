"""DGF (fused vs literal, gate side), AFLB's frequency split and TPGS on small images."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from m2restore.modules.aflb import AFLB, box_mask
from m2restore.modules.mcdb import DGF
from m2restore.modules.tpgs import TaskPrompt


def dgf_float64(dgf: DGF, y, mamba, prompt, residual, gate_weights_cnn: bool):
    """DGF written from the formula in float64: G = σ(g2·GELU(g1·[y ; p] + b1) + b2)."""
    p = {k: v.detach().double() for k, v in dgf.state_dict().items()}
    y, mamba, prompt, residual = y.double(), mamba.double(), prompt.double(), residual.double()
    c = y.shape[1]
    pv = F.linear(F.gelu(F.linear(prompt, p["prompt_mlp.0.weight"], p["prompt_mlp.0.bias"])),
                  p["prompt_mlp.2.weight"], p["prompt_mlp.2.bias"])                        # (B, C)
    g1 = p["gate1.weight"][:, :, 0, 0]
    pre = (torch.einsum("oc,bchw->bohw", g1[:, :c], y) + (pv @ g1[:, c:].T)[:, :, None, None]
           + p["gate1.bias"][:, None, None])
    gate = torch.sigmoid(torch.einsum("oc,bchw->bohw", p["gate2.weight"][:, :, 0, 0], F.gelu(pre))
                         + p["gate2.bias"][:, None, None])                                # (B, 1, H, W)
    cnn = F.gelu(F.conv2d(y, p["dwconv.weight"], p["dwconv.bias"], padding=1, groups=c))
    if gate_weights_cnn:
        return gate * cnn + (1 - gate) * mamba + residual
    return gate * mamba + (1 - gate) * cnn + residual


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("gate_weights_cnn", [True, False])
def test_dgf_matches_its_formula(backend, gate_weights_cnn):
    torch.manual_seed(0)
    dgf = DGF(16, prompt_dim=512, backend=backend, gate_weights_cnn=gate_weights_cnn)
    y, mamba, residual = torch.randn(2, 16, 7, 9), torch.randn(2, 16, 7, 9), torch.randn(2, 16, 7, 9)
    prompt = torch.randn(2, 512)
    with torch.no_grad():
        out = dgf(y, mamba, prompt, residual=residual)
    ref = dgf_float64(dgf, y, mamba, prompt, residual, gate_weights_cnn)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_dgf_gate_weights_the_cnn_branch(backend):
    # An open gate (G → 1) passes the CNN branch in the paper's orientation, Mamba in the public code's.
    torch.manual_seed(1)
    y, mamba = torch.randn(1, 8, 5, 5), torch.randn(1, 8, 5, 5)
    for gate_weights_cnn in (True, False):
        dgf = DGF(8, prompt_dim=4, backend=backend, gate_weights_cnn=gate_weights_cnn)
        with torch.no_grad():
            dgf.gate2.bias.fill_(40.0)
            dgf.gate2.weight.zero_()
            out = dgf(y, mamba, torch.randn(1, 4))
        cnn = F.gelu(dgf.dwconv(y)).detach()
        torch.testing.assert_close(out, cnn if gate_weights_cnn else mamba)


def test_box_mask_is_the_centred_box_of_the_shifted_spectrum():
    mask = box_mask(torch.tensor([[0.5, 0.75]]), 8, 12)  # n_h = int(0.5·4) = 2, n_w = int(0.75·6) = 4
    shifted = torch.zeros(8, 12)
    shifted[4 - 2:4 + 2, 6 - 4:6 + 4] = 1
    assert mask.shape == (1, 1, 8, 12)
    assert torch.equal(mask[0, 0], torch.fft.ifftshift(shifted))
    assert mask[0, 0, 0, 0] == 1  # the DC term is low frequency
    assert box_mask(torch.tensor([[0.1, 0.9]]), 4, 4).sum() == 0  # int(0.1·2) = 0 rows: empty


@pytest.mark.parametrize("h, w, t, half", [
    (255, 300, (0.99, 0.6), (0, 1)),    # 255 // 128 = 1: int(0.99) = 0 rows; 300 // 128 = 2: int(1.2) = 1
    (256, 640, (0.6, 0.7), (1, 3)),     # int(2·0.6) = 1, int(5·0.7) = 3
    (64, 64, (0.999, 0.999), (0, 0)),   # every map under 256 pixels: empty
])
def test_adair_box_sizes_the_half_extent_as_int_of_h_div_128_times_t(h, w, t, half):
    mask = box_mask(torch.tensor([t], dtype=torch.float64), h, w, box="adair")
    shifted = torch.zeros(h, w, dtype=torch.float64)
    shifted[h // 2 - half[0]:h // 2 + half[0], w // 2 - half[1]:w // 2 + half[1]] = 1
    assert torch.equal(mask[0, 0], torch.fft.ifftshift(shifted))
    with pytest.raises(ValueError, match="box"):
        box_mask(torch.tensor([t]), h, w, box="quarter")


def test_adair_box_leaves_no_low_band_under_256_pixels():
    torch.manual_seed(5)
    adair, half = AFLB(16, heads=4, box="adair"), AFLB(16, heads=4)
    half.load_state_dict(adair.state_dict())
    f = torch.randn(2, 16, 96, 80, dtype=torch.float64)
    with torch.no_grad():
        low, high = adair.double().split_frequencies(f)
        half_low, _ = half.double().split_frequencies(f)
    assert torch.equal(low, torch.zeros_like(f)) and torch.equal(high, f.abs())
    assert half_low.abs().amax() > 0.1  # the default box is not empty at this size


def test_frequency_split_matches_a_two_transform_float64_computation():
    torch.manual_seed(2)
    aflb = AFLB(16, heads=4)
    f = torch.randn(2, 16, 12, 10)
    with torch.no_grad():
        low, high = aflb.split_frequencies(f)
        t = torch.sigmoid(aflb.rate_conv(f.mean(dim=(2, 3), keepdim=True)))[:, :, 0, 0]
    # AdaIR's form: shift, mask, unshift, one inverse transform per part
    mask = torch.fft.fftshift(box_mask(t, 12, 10), dim=(-2, -1)).double()
    spectrum = torch.fft.fftshift(torch.fft.fft2(f.double(), norm="forward"), dim=(-2, -1))
    part = lambda m: torch.fft.ifft2(torch.fft.ifftshift(spectrum * m, dim=(-2, -1)), norm="forward").abs()
    assert 0 < mask.sum() < mask.numel()
    torch.testing.assert_close(low.double(), part(mask), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(high.double(), part(1 - mask), rtol=1e-5, atol=1e-5)


def test_aflb_starts_as_the_identity_on_the_features():
    torch.manual_seed(3)
    aflb = AFLB(32, heads=4)
    features = torch.randn(2, 32, 6, 6)
    with torch.no_grad():
        out = aflb(torch.rand(2, 3, 48, 48), features)
        nn.init.constant_(aflb.a, 1.0)
        changed = aflb(torch.rand(2, 3, 48, 48), features)
    assert torch.equal(out, features)  # a = 0, b = 1 at init (AdaIR)
    assert not torch.allclose(changed, features)


def test_task_prompt_pads_images_below_nine_pixels_by_replication():
    torch.manual_seed(4)
    tp = TaskPrompt(hidden=16, prompt_len=8, prompt_dim=32)
    small = torch.rand(2, 3, 8, 5)
    with torch.no_grad():
        out = tp(small)
        ref = tp(F.pad(small, (0, 4, 0, 1), mode="replicate"))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert out.shape == (2, 32)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gdfn_matches_restormers_formula(bias, channels_last):
    """GDFN = 1×1 to 2·hidden, depthwise 3×3, gelu(first half)·(second half), 1×1 back, computed
    here as Restormer writes it (one conv each, then chunk), on both memory formats."""
    from m2restore.modules.transformer import GDFN

    torch.manual_seed(3)
    ffn = GDFN(12, expansion=2.66, bias=bias).double()
    for p in ffn.parameters():
        nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 12, 9, 14, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    z = F.conv2d(x, ffn.project_in.weight, ffn.project_in.bias)
    a, b = F.conv2d(z, ffn.dwconv.weight, ffn.dwconv.bias, padding=1, groups=z.shape[1]).chunk(2, dim=1)
    expected = F.conv2d(F.gelu(a) * b, ffn.project_out.weight, ffn.project_out.bias)
    torch.testing.assert_close(ffn(x), expected, rtol=1e-12, atol=1e-12)


def test_transformer_block_runs_channels_last_with_the_values_of_its_formula():
    """x + MDTA(LN(x)), then + GDFN(LN(.)), computed here from the block's own sub-modules on an NCHW
    tensor: the block's switch to channels-last changes the layout of its output, not its values."""
    from m2restore.modules.transformer import TransformerBlock

    torch.manual_seed(4)
    block = TransformerBlock(16, heads=2).double()
    x = torch.randn(2, 16, 11, 7, dtype=torch.float64)
    mid = x + block.attn(block.norm1(x))
    expected = mid + block.ffn(block.norm2(mid))
    y = block(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
