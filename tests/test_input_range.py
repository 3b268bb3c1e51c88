"""The network's input range (``M2RestoreConfig.input_range``): [0, 1] by default, [-1, 1] for
weights of the authors' code, whose loaders feed the network ``Normalize(0.5, 0.5)`` of the degraded
image and score its output against the [0, 1] ground truth.

The expectations are a second network with the same weights and the default range fed
``normalize(x) = (x − 0.5) / 0.5`` computed here in float64: what the authors' ``net(normalize(x))``
computes, written from the mapping, not from their code.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from m2restore.cli import main
from m2restore.config import UNIT_RANGE, M2RestoreConfig, to_input_range
from m2restore.data.io import ImageData, read_image, write_image
from m2restore.model import M2Restore
from m2restore.prior.cache import PriorCache, write_prior_cache
from m2restore.prior.daclip import DAClipPrior
from m2restore.restore import DEMO_WEIGHTS, restore_tensor
from tests.test_authors import authors_state_dict, make_model, tiny_authors
from tests.test_daclip import TINY_CLIP, pixels, tiny_prior


def normalize(x: torch.Tensor) -> torch.Tensor:
    """torchvision's Normalize(mean=0.5, std=0.5), in float64."""
    return (x.double() - 0.5) / 0.5


def bilinear_prior() -> DAClipPrior:
    """A tiny DA-CLIP prepared as authors() prepares it (bilinear, float16 text side)."""
    prior = tiny_prior()
    prior.preprocessing, prior.fp16_text = "bilinear", True
    return prior


class _Recording(torch.nn.Module):
    """Wraps a prior and keeps what it was given."""

    def __init__(self, prior):
        super().__init__()
        self.inner, self.seen = prior, []
        self.preprocessing, self.fp16_text = prior.preprocessing, prior.fp16_text

    def forward(self, images):
        self.seen.append(images.detach().clone())
        return self.inner(images)


def _pair(prior=None):
    """An authors() network with [-1, 1] inputs and the same weights with [0, 1] inputs, float64."""
    model = make_model(tiny_authors(prior_dim=TINY_CLIP["embed_dim"])).double()
    unit = M2Restore(dataclasses.replace(model.config, input_range=UNIT_RANGE),
                     prior=model.prior).double().eval()
    unit.load_state_dict(model.state_dict())
    if prior is not None:
        model.set_prior(prior)
        unit.set_prior(prior)
    return model, unit


def test_authors_preset_maps_inputs_to_minus_one_one_and_older_configs_keep_zero_one():
    assert M2RestoreConfig.authors().input_range == (-1.0, 1.0)
    assert M2RestoreConfig().input_range == M2RestoreConfig.tiny().input_range == UNIT_RANGE
    old = {k: v for k, v in M2RestoreConfig.tiny().to_dict().items() if k != "input_range"}
    assert M2RestoreConfig.from_dict(old).input_range == UNIT_RANGE
    demo = json.loads((DEMO_WEIGHTS / "config.json").read_text())
    assert "input_range" not in demo and M2RestoreConfig.from_dict(demo).input_range == UNIT_RANGE
    saved = M2RestoreConfig.authors().to_dict()
    assert saved["input_range"] == [-1.0, 1.0] and M2RestoreConfig.from_dict(saved) == M2RestoreConfig.authors()
    x = torch.rand(2, 3, 5, 7)
    assert to_input_range(x, UNIT_RANGE) is x  # the default computes exactly as before
    assert torch.equal(to_input_range(x, (-1.0, 1.0)), (x - 0.5) / 0.5)  # bit for bit torchvision's Normalize
    for bad in ((1.0, 0.0), (0.0,), ("a", 1)):
        with pytest.raises(ValueError, match="input_range"):
            M2RestoreConfig(input_range=bad, prior_preprocess="bilinear")
    with pytest.raises(ValueError, match="prior_preprocess='daclip'"):
        M2RestoreConfig(input_range=(-1.0, 1.0))


def test_every_quantity_sees_the_mapped_input_and_the_output_is_not_mapped_back():
    """forward(x) of the [-1, 1] network is the [0, 1] network's forward of normalize(x): the
    prior, the task prompt, the AFLBs and the residual all read normalize(x); the result is
    returned as is (no inverse map), as the authors score it against the [0, 1] ground truth."""
    recording = _Recording(bilinear_prior().double())
    model, unit = _pair(recording)
    torch.manual_seed(3)
    x = torch.rand(1, 3, 13, 22, dtype=torch.float64)
    with torch.no_grad():
        got, aux = model(x, return_aux=True)
        expected, expected_aux = unit(normalize(x), return_aux=True)
        ours = unit(x)  # what the converted weights computed before the field existed
    torch.testing.assert_close(recording.seen[0], normalize(x), rtol=0, atol=0)
    assert recording.seen[0].min() < -0.9 and recording.seen[0].max() > 0.9
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    for a, b in zip(aux.routing, expected_aux.routing):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert (got - ours).abs().max() > 0.1


def test_tiles_and_prior_caches_map_the_input_the_same_way(tmp_path, capsys):
    """restore_tensor's tiles (prior and task prompt of the whole image, windows through forward)
    and a prior cache written for the [-1, 1] network give what the [0, 1] network gives on
    normalize(x); training refuses a cache written for another range or preparation."""
    prior = bilinear_prior().double()
    model, unit = _pair(prior)
    torch.manual_seed(4)
    x = torch.rand(1, 3, 24, 44, dtype=torch.float64)  # two 32-pixel tiles side by side
    tiled = restore_tensor(model, x, tile=32, overlap=8, stat_passes=1)
    expected = restore_tensor(unit, normalize(x), tile=32, overlap=8, stat_passes=1)
    torch.testing.assert_close(tiled, expected, rtol=0, atol=1e-12)
    assert (tiled - restore_tensor(unit, x, tile=32, overlap=8, stat_passes=0)).abs().max() > 0.05

    images = tmp_path / "data" / "input"  # a paired folder, as train's --data takes
    pixels = np.random.default_rng(0).integers(0, 256, (2, 36, 44, 3)).astype(np.float32) / 255
    for i, rgb in enumerate(pixels):
        write_image(images / f"{i}.png", ImageData(rgb))
        write_image(tmp_path / "data" / "gt" / f"{i}.png", ImageData(rgb))
    prior32 = bilinear_prior()
    for input_range in (UNIT_RANGE, (-1.0, 1.0)):
        out = tmp_path / f"cache{input_range[0]}.safetensors"
        write_prior_cache(prior32, sorted(images.glob("*.png")), images, out, progress=False, input_range=input_range)
        cache = PriorCache(out)
        assert cache.input_range == input_range and cache.preprocessing == "bilinear" and cache.fp16_text is True
        x = torch.from_numpy(pixels[1]).permute(2, 0, 1)[None]
        d_g, p_f = prior32((x - 0.5) / 0.5 if input_range != UNIT_RANGE else x)
        torch.testing.assert_close(cache["1.png"][0], d_g[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(cache["1.png"][1], p_f[0], rtol=0, atol=1e-5)
    assert main(["train", "--config", "tiny", "--data", str(images.parent), "--out", str(tmp_path / "run"),
                 "--prior-cache", str(out), "--device", "cpu"]) == 2
    assert "--preprocess daclip --input-range 0,1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["prior-cache", "--checkpoint", "x.pt", "--images", str(images), "--out", str(out),
              "--input-range", "1,-1"])
    assert exc.value.code == 2
    assert "--input-range" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:M2Restore has no degradation prior")
def test_converted_checkpoint_restores_through_the_cli_as_their_pipeline_does(tmp_path, monkeypatch):
    """An authors() checkpoint converted by ``m2restore convert-authors`` and run by ``m2restore
    restore`` on an 8-bit PNG gives, to 8-bit rounding, their ``net(normalize(x))``: x = PNG / 255
    (their ToTensor) normalised in float64 and run through the same weights in float64, the DA-CLIP
    prior included (a tiny one: ``--prior-checkpoint`` loads it with the tiny open_clip config)."""
    model = make_model(tiny_authors(prior_dim=TINY_CLIP["embed_dim"]), seed=5)
    ckpt = tmp_path / "epoch=9.ckpt"
    torch.save({"state_dict": {"net." + k: v for k, v in authors_state_dict(model).items()}}, ckpt)
    assert main(["convert-authors", str(ckpt), "-o", str(tmp_path / "converted")]) == 0
    saved = json.loads((tmp_path / "converted" / "config.json").read_text())
    assert saved["input_range"] == [-1.0, 1.0]

    prior = bilinear_prior()
    daclip = tmp_path / "daclip.pt"
    torch.save(prior.state_dict_public(), daclip)
    load = DAClipPrior.from_checkpoint.__func__
    monkeypatch.setattr(DAClipPrior, "from_checkpoint",
                        classmethod(lambda cls, path, **kw: load(cls, path, model_cfg=TINY_CLIP, **kw)))

    rng = np.random.default_rng(7)
    u8 = rng.integers(0, 256, (19, 26, 3), dtype=np.uint8)
    write_image(tmp_path / "in" / "rainy.png", ImageData(u8.astype(np.float32) / 255))
    assert main(["restore", str(tmp_path / "in" / "rainy.png"), "-o", str(tmp_path / "out"), "-q",
                 "--weights", str(tmp_path / "converted"), "--prior-checkpoint", str(daclip),
                 "--backend", "torch", "--device", "cpu", "--dtype", "fp32"]) == 0
    got = np.rint(read_image(tmp_path / "out" / "rainy.png").rgb.astype(np.float64) * 255)

    x = torch.from_numpy(u8).double().permute(2, 0, 1)[None] / 255  # their ToTensor
    _, unit = _pair()
    unit.load_state_dict(model.double().state_dict())
    with torch.no_grad():
        # DA-CLIP in float32 with its float16 text side, as the CLI runs it; the network in float64.
        priors = {k: tuple(t.double() for t in prior(v.float())) for k, v in (("their", normalize(x)), ("ours", x))}
        their = unit(normalize(x), prior=priors["their"]).clamp(0, 1)[0].permute(1, 2, 0).numpy()
        ours_before = unit(x, prior=priors["ours"]).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    expected = np.rint(their * 255)
    assert np.abs(got - expected).max() <= 1 and (got != expected).mean() < 0.01
    assert np.abs(got - np.rint(ours_before * 255)).mean() > 5  # the test tells the two apart


def test_fp16_text_side_is_their_autocast_similarity():
    """prior_fp16_text (set by authors()): the text tower under float16 autocast, text and degradation
    features divided by their float32 norms into float16, and (100·degra) @ textᵀ in float16 before
    the softmax, as their forward computes d_g under CUDA autocast; P_f does not change."""
    import open_clip

    assert M2RestoreConfig.authors().prior_fp16_text and not M2RestoreConfig().prior_fp16_text
    assert not M2RestoreConfig.from_dict(json.loads((DEMO_WEIGHTS / "config.json").read_text())).prior_fp16_text
    prior = tiny_prior()
    x = pixels()
    d32, p32 = prior(x)
    prior.fp16_text = True
    d16, p16 = prior(x)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.float16):
            text = prior.clip.encode_text(open_clip.tokenize(list(prior.names))).float()
        _, degra = prior.encode_image(prior.preprocess(x))
    text = (text / text.norm(dim=-1, keepdim=True)).half()
    degra = (degra / degra.norm(dim=-1, keepdim=True)).half()
    assert torch.equal(prior.text_features(), text)
    torch.testing.assert_close(d16, torch.softmax(((100.0 * degra) @ text.T).float(), dim=-1), rtol=0, atol=1e-6)
    assert torch.equal(p16, p32) and 1e-5 < (d16 - d32).abs().max() < 1e-2
    with pytest.warns(UserWarning, match="prior_fp16_text"):
        M2Restore(tiny_authors(prior_dim=TINY_CLIP["embed_dim"], prior_fp16_text=False), prior=bilinear_prior())
