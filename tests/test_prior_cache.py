"""Prior cache: the CLI writes (d_g, P_f) per image file, PriorCache reads them back, and the model
restores the same image from cached and from live priors."""
import json
import warnings
from pathlib import PurePath

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from m2restore.cli import main
from m2restore.prior.cache import PriorCache, find_images, write_prior_cache
from m2restore.prior.daclip import DACLIP_NAMES, DAClipPrior
from tests.test_daclip import TINY_CLIP, tiny_prior

SIZES = {"a.png": (40, 52), "b.png": (32, 32), "sub/c.png": (24, 24), "sub/deeper/d.jpg": (24, 24), "sub/e.png": (24, 24)}


@pytest.fixture
def image_dir(tmp_path):
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for rel, (h, w) in SIZES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / rel)
    (root / "notes.txt").write_text("not an image")
    return root


def _pixels(path):
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(rgb).permute(2, 0, 1)[None]


def test_cli_round_trip(tmp_path, image_dir):
    prior = tiny_prior(seed=5, names=DACLIP_NAMES)
    checkpoint = tmp_path / "daclip_tiny.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in prior.state_dict_public().items()}}, checkpoint)
    model_cfg = tmp_path / "tiny_clip.json"
    model_cfg.write_text(json.dumps(TINY_CLIP))
    out = tmp_path / "cache.safetensors"

    rc = main(["prior-cache", "--checkpoint", str(checkpoint), "--images", str(image_dir), "--out", str(out),
               "--model-config", str(model_cfg), "--batch-size", "2", "--device", "cpu",
               "--names", ",".join(DACLIP_NAMES)])
    assert rc == 0

    cache = PriorCache(out)
    assert cache.keys() == sorted(SIZES) and len(cache) == len(SIZES)
    assert cache.names == DACLIP_NAMES and cache.model == "ViT-B-32"
    assert cache.metadata["checkpoint"] == "daclip_tiny.pt"
    assert json.loads(cache.metadata["model_cfg"])["vision_cfg"]["width"] == TINY_CLIP["vision_cfg"]["width"]
    for rel in SIZES:
        d_g, p_f = cache[rel]
        live_d_g, live_p_f = prior(_pixels(image_dir / rel))
        assert d_g.shape == (len(DACLIP_NAMES),) and p_f.shape == (TINY_CLIP["embed_dim"],)
        torch.testing.assert_close(d_g, live_d_g[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p_f, live_p_f[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preprocess", ["daclip", "bilinear"])
def test_cli_preprocessing_matches_the_live_prior(tmp_path, image_dir, preprocess):
    """A cache for an ``authors()`` model must see the images as that model's prior does."""
    prior = tiny_prior(seed=6, names=DACLIP_NAMES)
    checkpoint = tmp_path / "daclip_tiny.pt"
    torch.save(prior.state_dict_public(), checkpoint)
    model_cfg = tmp_path / "tiny_clip.json"
    model_cfg.write_text(json.dumps(TINY_CLIP))
    out = tmp_path / "cache.safetensors"
    assert main(["prior-cache", "--checkpoint", str(checkpoint), "--images", str(image_dir), "--out", str(out),
                 "--model-config", str(model_cfg), "--device", "cpu", "--names", ",".join(DACLIP_NAMES),
                 "--preprocess", preprocess]) == 0
    cache = PriorCache(out)
    assert cache.preprocessing == preprocess
    live = DAClipPrior.from_checkpoint(checkpoint, names=DACLIP_NAMES, model_cfg=TINY_CLIP, preprocessing=preprocess)
    other = DAClipPrior.from_checkpoint(checkpoint, names=DACLIP_NAMES, model_cfg=TINY_CLIP,
                                        preprocessing="bilinear" if preprocess == "daclip" else "daclip")
    rel = sorted(SIZES)[0]
    d_g, p_f = cache[rel]
    torch.testing.assert_close(p_f, live(_pixels(image_dir / rel))[1][0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(p_f, other(_pixels(image_dir / rel))[1][0], rtol=1e-3, atol=1e-4)


def test_cli_without_images_fails(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = main(["prior-cache", "--checkpoint", str(tmp_path / "x.pt"), "--images", str(tmp_path / "empty"),
               "--out", str(tmp_path / "c.safetensors")])
    assert rc == 2 and "no image files" in capsys.readouterr().err


def test_reader_lookups_and_errors(tmp_path, image_dir):
    prior = tiny_prior(seed=6)
    out = tmp_path / "cache.safetensors"
    images = find_images(image_dir)
    assert [p.relative_to(image_dir).as_posix() for p in images] == sorted(SIZES)
    assert write_prior_cache(prior, images, image_dir, out, batch_size=3, progress=False) == len(SIZES)
    cache = PriorCache(out)
    assert PurePath("sub", "c.png") in cache and "missing.png" not in cache
    torch.testing.assert_close(cache[PurePath("sub", "c.png")][0], cache["sub/c.png"][0], rtol=0, atol=0)
    with pytest.raises(KeyError, match="missing.png"):
        cache["missing.png"]

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(other))
    with pytest.raises(ValueError, match="not a prior cache"):
        PriorCache(other)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a safetensors prior cache"):
        PriorCache(junk)


def test_model_restores_identically_from_cached_and_live_priors(tmp_path, image_dir):
    from m2restore import M2Restore, M2RestoreConfig

    prior = tiny_prior(seed=7)
    out = tmp_path / "cache.safetensors"
    write_prior_cache(prior, find_images(image_dir), image_dir, out, progress=False)
    cache = PriorCache(out)

    config = M2RestoreConfig.tiny()
    config.backend = "torch"
    config.prior_dim = prior.embed_dim
    torch.manual_seed(0)
    live = M2Restore(config, prior=prior).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no prior: the NullPrior warning
        cached = M2Restore(config).eval()
    cached.load_state_dict(live.state_dict())
    assert not any(k.startswith("prior.") or ".clip." in k for k in live.state_dict())

    rels = ["sub/c.png", "sub/deeper/d.jpg", "sub/e.png"]  # same size: one batch
    x = torch.cat([_pixels(image_dir / r) for r in rels])
    d_g, p_f = (torch.stack(t) for t in zip(*(cache[r] for r in rels)))
    with torch.no_grad():
        from_live = live(x)
        from_cache = cached(x, prior=(d_g, p_f))
        without_prior = cached(x)
    torch.testing.assert_close(from_cache, from_live, rtol=1e-5, atol=1e-6)
    assert (from_live - without_prior).abs().max() > 1e-6  # the prior does reach the output


def test_from_pretrained_with_prior_checkpoint(tmp_path, monkeypatch):
    from m2restore import M2Restore, M2RestoreConfig

    source = tiny_prior(seed=8)
    checkpoint = tmp_path / "daclip.pt"
    torch.save(source.state_dict_public(), checkpoint)
    # from_pretrained builds the ViT-B-32 DA-CLIP; point it at the tiny architecture instead.
    load = DAClipPrior.from_checkpoint.__func__
    monkeypatch.setattr(DAClipPrior, "from_checkpoint",
                        classmethod(lambda cls, path, **kw: load(cls, path, model_cfg=TINY_CLIP, **kw)))

    config = M2RestoreConfig.tiny()
    config.backend = "torch"
    config.prior_dim = source.embed_dim
    config.degradation_names = DACLIP_NAMES
    source.names = DACLIP_NAMES
    torch.manual_seed(1)
    model = M2Restore(config, prior=source).eval()
    model.save_pretrained(tmp_path / "run")
    restored = M2Restore.from_pretrained(tmp_path / "run", prior_checkpoint=checkpoint).eval()

    assert isinstance(restored.prior, DAClipPrior) and restored.prior.names == DACLIP_NAMES
    x = torch.rand(1, 3, 20, 28)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)
