"""save_pretrained / from_pretrained: safetensors + JSON, strict key and shape checks, the prior."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import m2restore.prior
from m2restore import M2Restore, M2RestoreConfig, NullPrior


def tiny(**overrides) -> M2Restore:
    torch.manual_seed(0)
    return M2Restore(M2RestoreConfig.tiny(backend="torch", **overrides), prior=NullPrior(6))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny()
    directory = tmp_path_factory.mktemp("weights")
    model.save_pretrained(directory)
    return model, directory


def test_round_trip_restores_the_same_network(saved):
    model, directory = saved
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((directory / "config.json").read_text()) == model.config.to_dict()
    loaded = M2Restore.from_pretrained(directory, prior=NullPrior(6))
    assert loaded.config == model.config
    x = torch.rand(1, 3, 16, 24)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))


def _rewrite(directory, out, edit_state=None, edit_config=None):
    out.mkdir()
    config = json.loads((directory / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(edit_config(config) if edit_config else config))
    state = load_file(str(directory / "model.safetensors"))
    save_file(edit_state(state) if edit_state else state, str(out / "model.safetensors"))
    return out


def test_checkpoint_of_another_config_names_the_first_mismatching_key_and_both_shapes(saved, tmp_path):
    _, directory = saved
    wider = _rewrite(directory, tmp_path / "wider", edit_config=lambda c: {**c, "dim": 16})
    # the task prompt does not depend on dim; the patch embedding is the first tensor that does
    with pytest.raises(ValueError, match=r"key 'patch_embed.weight' has shape \(8, 3, 3, 3\) in the checkpoint, "
                                         r"\(16, 3, 3, 3\) in the model"):
        M2Restore.from_pretrained(wider, prior=NullPrior(6))


def test_missing_and_unexpected_keys_are_named(saved, tmp_path):
    _, directory = saved
    missing = _rewrite(directory, tmp_path / "missing", edit_state=lambda s: {k: v for k, v in s.items() if k != "latent.0.mamba.D"})
    with pytest.raises(ValueError, match="missing key 'latent.0.mamba.D'"):
        M2Restore.from_pretrained(missing, prior=NullPrior(6))
    extra = _rewrite(directory, tmp_path / "extra", edit_state=lambda s: {**s, "head.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="unexpected key 'head.weight'"):
        M2Restore.from_pretrained(extra, prior=NullPrior(6))


class _FakeDAClip(torch.nn.Module):
    """Stands in for DAClipPrior (which needs open_clip and a checkpoint): records how it was built."""

    calls = []

    def __init__(self, names, preprocessing="daclip"):
        super().__init__()
        self.names = names
        self.preprocessing = preprocessing
        self.scale = torch.nn.Parameter(torch.ones(1), requires_grad=False)

    @classmethod
    def from_checkpoint(cls, path, names, preprocessing="daclip", fp16_text=False):
        cls.calls.append((str(path), tuple(names), preprocessing))
        assert fp16_text is False  # tiny() computes DA-CLIP's text side in float32
        return cls(names, preprocessing)

    def forward(self, images):
        b = images.shape[0]
        return images.new_full((b, len(self.names)), 1 / len(self.names)), images.new_ones(b, 512) * self.scale


def test_prior_checkpoint_builds_the_daclip_prior_with_the_config_names(saved, monkeypatch):
    _, directory = saved
    monkeypatch.setattr(m2restore.prior, "DAClipPrior", _FakeDAClip, raising=False)
    model = M2Restore.from_pretrained(directory, prior_checkpoint="daclip_ViT-B-32.pt", map_location="cpu")
    assert _FakeDAClip.calls == [("daclip_ViT-B-32.pt", M2RestoreConfig.tiny().degradation_names, "daclip")]
    assert isinstance(model.prior, _FakeDAClip)
    with pytest.raises(ValueError, match="not both"):
        M2Restore.from_pretrained(directory, prior=NullPrior(6), prior_checkpoint="x.pt")


def test_prior_checkpoint_prepares_images_as_the_config_says(saved, tmp_path, monkeypatch):
    _, directory = saved
    config = json.loads((directory / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "prior_preprocess": "bilinear"}))
    (tmp_path / "model.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
    monkeypatch.setattr(m2restore.prior, "DAClipPrior", _FakeDAClip, raising=False)
    monkeypatch.setattr(_FakeDAClip, "calls", [])
    model = M2Restore.from_pretrained(tmp_path, prior_checkpoint="daclip_ViT-B-32.pt")
    assert _FakeDAClip.calls[0][2] == "bilinear" and model.prior.preprocessing == "bilinear"


def test_a_module_prior_is_not_saved(tmp_path):
    model = M2Restore(M2RestoreConfig.tiny(backend="torch"), prior=_FakeDAClip(M2RestoreConfig().degradation_names))
    model.save_pretrained(tmp_path)
    assert set(load_file(str(tmp_path / "model.safetensors"))) == set(tiny().state_dict())


def test_trained_with_prior_round_trips_and_decides_the_null_prior_warning(tmp_path):
    """Weights trained without a prior say so in config.json; loading them without one is then
    expected and silent, while weights trained with a prior still warn."""
    import warnings

    from m2restore.model import PRETRAINED, pretrained_path
    from m2restore.restore import DEMO_WEIGHTS

    for trained_with_prior in (True, False):
        directory = tmp_path / str(trained_with_prior)
        tiny(trained_with_prior=trained_with_prior).save_pretrained(directory)
        assert json.loads((directory / "config.json").read_text())["trained_with_prior"] is trained_with_prior
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            loaded = M2Restore.from_pretrained(directory)
        assert loaded.config.trained_with_prior is trained_with_prior
        assert [str(w.message).startswith("M2Restore has no degradation prior") for w in record] == (
            [True] if trained_with_prior else [])
    # Configs written before the field existed were trained with the prior (the default).
    assert M2RestoreConfig.from_dict({"dim": 8}).trained_with_prior is True
    assert "demo" in PRETRAINED and pretrained_path("demo") == DEMO_WEIGHTS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        demo = M2Restore.from_pretrained("demo")
    assert demo.config.trained_with_prior is False and demo.config.dim == 8


def test_training_without_a_prior_records_it(capsys):
    from m2restore.train import build_model

    assert build_model("tiny").config.trained_with_prior is False
    assert "training without the DA-CLIP prior" in capsys.readouterr().out
    # Cached priors stand in for DA-CLIP (quiet=True): the weights are trained with a prior.
    assert build_model("tiny", quiet=True).config.trained_with_prior is True
