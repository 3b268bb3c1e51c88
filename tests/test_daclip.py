"""DA-CLIP prior on pip's open_clip: injection order, preprocessing, d_g, checkpoint loading.

Every CLIP here is tiny and random; nothing is downloaded.
"""
import copy
import dataclasses

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_STD
from PIL import Image

from m2restore.prior.daclip import DACLIP_NAMES, DEFAULT_NAMES, DAClipPrior

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def tiny_prior(seed=0, names=DEFAULT_NAMES, trained_controller=True):
    """A tiny DA-CLIP; with ``trained_controller`` its controller and zero layers are perturbed so
    that they differ from the frozen tower, as in a trained checkpoint."""
    torch.manual_seed(seed)
    prior = DAClipPrior(names=names, model_cfg=TINY_CLIP)
    if trained_controller:
        with torch.no_grad():
            for p in prior.visual_control.parameters():
                p.add_(0.05 * torch.randn_like(p))
            for p in prior.control_zero.parameters():
                p.normal_(0, 0.05)
    return prior


def pixels(batch=2, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_zero_controller_reproduces_open_clip():
    prior = tiny_prior(trained_controller=False)
    x = pixels()
    image_features, degra_features = prior.encode_image(x)
    expected = prior.clip.encode_image(x)  # pip open_clip's own forward
    torch.testing.assert_close(image_features, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(degra_features, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(prior.encode_image(x, control=False), expected)


def _capture_outputs(blocks, store):
    return [b.register_forward_hook(lambda m, i, o, j=j: store.__setitem__(j, o)) for j, b in enumerate(blocks)]


def _add_after(blocks, additions):
    return [blocks[j].register_forward_hook(lambda m, i, o, h=h: o + h) for j, h in additions.items()]


@pytest.mark.parametrize("nonzero", [[0], [1], [0, 1]], ids=["block0", "block1", "both"])
def test_hidden_i_is_added_after_block_L_minus_1_minus_i(nonzero):
    prior = tiny_prior(trained_controller=False)
    with torch.no_grad():
        for p in prior.visual_control.parameters():  # a controller that differs from the frozen tower
            p.add_(0.05 * torch.randn_like(p))
        for i in nonzero:
            prior.control_zero[i].weight.normal_(0, 0.2)
            prior.control_zero[i].bias.normal_(0, 0.2)
    x = pixels()
    image_features, degra_features = prior.encode_image(x)

    # Independent forward: open_clip's own VisionTransformer.forward, with hooks that read the
    # controller's block outputs and add hidden i to the frozen tower's output of block L-1-i.
    ctrl_blocks = prior.visual_control.transformer.resblocks
    clip_blocks = prior.clip.visual.transformer.resblocks
    L = len(clip_blocks)
    outputs = {}
    handles = _capture_outputs(ctrl_blocks, outputs)
    expected_degra = prior.visual_control(x)
    for h in handles:
        h.remove()
    hiddens = {i: prior.control_zero[i](outputs[i]) for i in range(L)}
    plain = prior.clip.visual(x)
    handles = _add_after(clip_blocks, {L - 1 - i: hiddens[i] for i in nonzero})
    expected_image = prior.clip.visual(x)
    for h in handles:
        h.remove()
    handles = _add_after(clip_blocks, {i: hiddens[i] for i in nonzero})  # the non-reversed order
    wrong_order = prior.clip.visual(x)
    for h in handles:
        h.remove()

    torch.testing.assert_close(degra_features, expected_degra, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(image_features, expected_image, rtol=1e-5, atol=1e-6)
    assert (image_features - plain).abs().max() > 1e-3
    assert (image_features - wrong_order).abs().max() > 1e-3


def test_preprocess_matches_open_clip_pil_transform():
    """Same geometry and normalisation as open_clip's eval transform (PIL bicubic on 8-bit)."""
    prior = tiny_prior(trained_controller=False)
    transform = open_clip.image_transform(prior.image_size, is_train=False)
    one_level = 1.5 / 255 / min(OPENAI_DATASET_STD)  # PIL rounds to 8 bits after resizing
    for h, w in [(48, 80), (90, 45), (20, 27), (32, 50)]:
        yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
        rgb = np.stack([0.5 + 0.4 * np.sin(6 * xx + 2 * yy), yy, 0.5 + 0.4 * np.cos(15 * xx * yy)], -1)
        u8 = np.round(rgb * 255).astype(np.uint8)
        expected = transform(Image.fromarray(u8))
        ours = prior.preprocess(torch.from_numpy(u8).permute(2, 0, 1)[None].float() / 255)[0]
        assert ours.shape == expected.shape == (3, 32, 32)
        assert (ours - expected).abs().max() <= one_level, (h, w)


@pytest.mark.parametrize("names", [DEFAULT_NAMES, DACLIP_NAMES], ids=["6names", "10names"])
def test_d_g_is_softmax_of_scaled_cosine_similarity(names):
    prior = tiny_prior(names=names)
    images = torch.rand(3, 3, 41, 29, generator=torch.Generator().manual_seed(2))
    d_g, p_f = prior(images)
    assert d_g.shape == (3, len(names)) and p_f.shape == (3, prior.embed_dim)
    assert d_g.dtype == p_f.dtype == torch.float32
    assert (d_g >= 0).all()
    torch.testing.assert_close(d_g.sum(-1), torch.ones(3))

    image_features, degra = prior.encode_image(prior.preprocess(images))
    text = prior.clip.encode_text(open_clip.tokenize(list(names)))
    cosine = F.normalize(degra.double(), dim=-1) @ F.normalize(text.double(), dim=-1).T
    torch.testing.assert_close(d_g.double(), torch.softmax(100 * cosine, -1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(p_f, image_features)


def test_text_features_cached_until_names_change(monkeypatch):
    prior = tiny_prior()
    calls = []
    encode = prior.clip.encode_text
    monkeypatch.setattr(prior.clip, "encode_text", lambda t: calls.append(t.shape[0]) or encode(t))
    images = torch.rand(1, 3, 32, 32)
    assert prior(images)[0].shape == (1, 6)
    prior(images)
    assert calls == [6]
    prior.names = DACLIP_NAMES
    assert prior(images)[0].shape == (1, 10)
    assert calls == [6, 10]


def test_frozen_and_stays_in_eval():
    prior = tiny_prior()
    assert not any(p.requires_grad for p in prior.parameters())
    parent = torch.nn.Sequential(prior).train()
    assert parent.training and not prior.training and not prior.clip.visual.training
    images = torch.rand(2, 3, 33, 35, requires_grad=True)
    d_g, p_f = prior(images)
    assert not d_g.requires_grad and not p_f.requires_grad


@pytest.mark.parametrize("bad", [torch.rand(3, 32, 32), torch.rand(1, 4, 32, 32), torch.zeros(1, 3, 32, 32, dtype=torch.uint8)])
def test_bad_images_raise(bad):
    with pytest.raises(ValueError, match="images"):
        tiny_prior(trained_controller=False)(bad)


# ------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize(("module_prefix", "wrapped", "alias"), [
    (False, False, True), (True, True, True), (True, False, False), (False, True, False),
], ids=["bare-alias", "module.-state_dict-alias", "module.-no_alias", "state_dict-no_alias"])
def test_public_checkpoint_round_trip(tmp_path, module_prefix, wrapped, alias):
    source = tiny_prior(seed=3)
    state = source.state_dict_public(alias=alias)
    assert any(k.startswith("visual_control.transformer.zero_modules.1.") for k in state)
    assert any(k.startswith("visual_control.transformer.transformer.resblocks.1.") for k in state)
    assert "logit_scale" in state and "clip.logit_scale" in state
    assert any(k.startswith("visual.") for k in state) == alias
    if module_prefix:
        state = {"module." + k: v for k, v in state.items()}
    path = tmp_path / "daclip.pt"
    torch.save({"epoch": 3, "state_dict": state} if wrapped else state, path)

    loaded = DAClipPrior.from_checkpoint(path, names=DACLIP_NAMES, model_cfg=TINY_CLIP)
    fresh = tiny_prior(seed=4, names=DACLIP_NAMES)
    assert loaded.names == DACLIP_NAMES
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    source.names = DACLIP_NAMES
    images = torch.rand(2, 3, 40, 48)
    for got, want, other in zip(loaded(images), source(images), fresh(images)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert not torch.allclose(got, other)


def _write(tmp_path, state):
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)
    return path


def test_checkpoint_missing_key(tmp_path):
    state = tiny_prior().state_dict_public()
    del state["visual_control.transformer.zero_modules.1.bias"]
    del state["clip.ln_final.weight"]
    with pytest.raises(ValueError, match=r"missing keys \(2\): .*clip\.ln_final\.weight.*zero_modules\.1\.bias"):
        DAClipPrior.from_checkpoint(_write(tmp_path, state), model_cfg=TINY_CLIP)


def test_checkpoint_unexpected_keys_listed_first_five(tmp_path):
    state = tiny_prior().state_dict_public()
    for n in range(7):
        state[f"clip.extra{n}"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected keys \(7\): clip\.extra0, .*clip\.extra4, \.\.\.$") as err:
        DAClipPrior.from_checkpoint(_write(tmp_path, state), model_cfg=TINY_CLIP)
    assert "clip.extra5" not in str(err.value) and "missing" not in str(err.value)


def test_checkpoint_wrong_shape(tmp_path):
    state = tiny_prior().state_dict_public()
    state["visual_control.transformer.zero_modules.0.weight"] = torch.zeros(64, 32)
    with pytest.raises(ValueError, match=r"wrong shapes \(1\): visual_control\.transformer\.zero_modules\.0\.weight: \(64, 32\) vs \(64, 64\) expected$"):
        DAClipPrior.from_checkpoint(_write(tmp_path, state), model_cfg=TINY_CLIP)


def test_checkpoint_alias_must_match_clip_visual(tmp_path):
    state = tiny_prior().state_dict_public()
    state["visual.proj"] = state["visual.proj"] + 1
    with pytest.raises(ValueError, match=r"aliases differing from clip\.visual\.\* \(1\): visual\.proj$"):
        DAClipPrior.from_checkpoint(_write(tmp_path, state), model_cfg=TINY_CLIP)


def test_checkpoint_of_another_architecture(tmp_path):
    other = copy.deepcopy(TINY_CLIP)
    other["vision_cfg"]["layers"] = 3
    torch.manual_seed(0)
    state = DAClipPrior(model_cfg=other).state_dict_public()
    with pytest.raises(ValueError, match=r"unexpected keys \(\d+\): .*resblocks\.2\."):
        DAClipPrior.from_checkpoint(_write(tmp_path, state), model_cfg=TINY_CLIP)


def test_non_checkpoint_files_fail_clearly(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        DAClipPrior.from_checkpoint(text, model_cfg=TINY_CLIP)
    pickled_module = _write(tmp_path, torch.nn.Linear(2, 2))  # needs full unpickling: refused
    with pytest.raises(ValueError, match="weights_only=True"):
        DAClipPrior.from_checkpoint(pickled_module, model_cfg=TINY_CLIP)
    a_list = _write(tmp_path, [torch.zeros(2)])
    with pytest.raises(ValueError, match="does not hold a state dict"):
        DAClipPrior.from_checkpoint(a_list, model_cfg=TINY_CLIP)
    with pytest.raises(FileNotFoundError):
        DAClipPrior.from_checkpoint(tmp_path / "absent.pt", model_cfg=TINY_CLIP)


def test_unknown_model_name_does_not_fetch():
    with pytest.raises(ValueError, match="bundled"):
        DAClipPrior("hf-hub:someone/some-clip")


@pytest.mark.cuda
def test_cuda_autocast_matches_cpu_float32():
    prior = tiny_prior(seed=9)
    images = torch.rand(4, 3, 50, 70, generator=torch.Generator().manual_seed(3))
    d_g, p_f = prior(images)
    prior.cuda()
    d_g_cuda, p_f_cuda = prior(images.cuda())
    assert d_g_cuda.device.type == "cuda" and d_g_cuda.dtype == p_f_cuda.dtype == torch.float32
    torch.testing.assert_close(d_g_cuda.sum(-1).cpu(), torch.ones(4))
    assert (p_f_cuda.cpu() - p_f).norm() <= 2e-2 * p_f.norm()  # float16 autocast
    # d_g = softmax(100·cos): compare the log-probabilities up to their per-row shift.
    log_ratio = d_g_cuda.cpu().log() - d_g.log()
    assert (log_ratio - log_ratio.mean(-1, keepdim=True)).abs().max() <= 1.0


def test_bilinear_preprocessing_is_the_authors_torchvision_pipeline():
    """The authors' code: Resize(S, antialias=True) then CenterCrop(S) on the float tensor (bilinear,
    no clamp, no mean/std)."""
    from torchvision.transforms import CenterCrop, Compose, Resize

    prior = tiny_prior(trained_controller=False)
    prior.preprocessing = "bilinear"
    authors = Compose([Resize(prior.image_size, antialias=True), CenterCrop(prior.image_size)])
    g = torch.Generator().manual_seed(3)
    for h, w in [(48, 80), (90, 45), (20, 27), (32, 50), (32, 32)]:
        images = torch.rand(2, 3, h, w, generator=g)
        ours = prior.preprocess(images)
        assert ours.shape == (2, 3, 32, 32)
        torch.testing.assert_close(ours, authors(images), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="preprocessing"):
        DAClipPrior(model_cfg=TINY_CLIP, preprocessing="bicubic")


def test_model_warns_when_the_prior_prepares_images_otherwise_than_its_config():
    from m2restore import M2Restore, M2RestoreConfig

    prior = DAClipPrior(model_cfg=TINY_CLIP, preprocessing="bilinear")
    config = M2RestoreConfig.tiny(prior_dim=prior.embed_dim)
    with pytest.warns(UserWarning, match="prior_preprocess='daclip'"):
        M2Restore(config, prior=prior)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M2Restore(dataclasses.replace(config, prior_preprocess="bilinear"), prior=prior)
