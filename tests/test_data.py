"""Image I/O and the paired data sets (All-weather list and paired folders)."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from m2restore.data import PairedImages, allweather_pairs, open_pairs, paired_folder_pairs
from m2restore.data.io import ImageData, _read_png, read_image, write_image


# ---------------------------------------------------------------- image files

def test_png_decoder_matches_pillow_on_adaptive_filters(tmp_path):
    """Our PNG row unfiltering (used for 16-bit colour) against Pillow's decoder on an 8-bit
    photo, which Pillow's encoder filters with every filter type (Sub, Up, Average, Paeth)."""
    import skimage.data

    photo = skimage.data.astronaut()[::3, ::3]
    Image.fromarray(photo).save(tmp_path / "a.png")
    np.testing.assert_array_equal(_read_png(tmp_path / "a.png"), photo)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16bit_png_round_trip_is_exact(tmp_path, channels):
    rng = np.random.default_rng(channels)
    samples = rng.integers(0, 65536, (37, 53, channels), dtype=np.uint16)
    x = samples.astype(np.float32) / 65535.0
    gray = channels <= 2
    rgb = np.repeat(x[..., :1], 3, -1) if gray else x[..., :3]
    alpha = x[..., -1] if channels in (2, 4) else None
    write_image(tmp_path / "x.png", ImageData(rgb, alpha, 16, gray))
    back = read_image(tmp_path / "x.png")
    assert (back.bit_depth, back.grayscale, back.alpha is None) == (16, gray, alpha is None)
    assert np.array_equal(np.rint(back.rgb * 65535), np.rint(rgb * 65535))
    if alpha is not None:
        assert np.array_equal(np.rint(back.alpha * 65535), samples[..., -1])


def test_16bit_grayscale_png_written_by_pillow(tmp_path):
    values = (np.arange(37 * 53).reshape(37, 53) * 31).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "g.png")
    im = read_image(tmp_path / "g.png")
    assert im.bit_depth == 16 and im.grayscale and im.alpha is None
    np.testing.assert_array_equal(np.rint(im.rgb[..., 1] * 65535), values)


def test_8bit_rgba_and_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    im = read_image(tmp_path / "a.png")
    assert im.bit_depth == 8 and not im.grayscale
    np.testing.assert_array_equal(np.rint(im.alpha * 255), rgba[..., 3])
    np.testing.assert_array_equal(np.rint(im.rgb * 255), rgba[..., :3])
    with pytest.raises(ValueError, match=".jpg has no alpha"):
        write_image(tmp_path / "a.jpg", im)
    write_image(tmp_path / "b.jpg", ImageData(im.rgb))
    assert Image.open(tmp_path / "b.jpg").format == "JPEG"


def test_unreadable_and_missing_files_name_their_path(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match="broken.png"):
        read_image(bad)
    with pytest.raises(FileNotFoundError, match="nothere.png"):
        read_image(tmp_path / "nothere.png")


# ---------------------------------------------------------------- data sets

def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(path, ImageData(array))


def _allweather(root: Path, sizes) -> Path:
    rng = np.random.default_rng(0)
    lines = []
    for i, (h, w) in enumerate(sizes):
        gt = rng.random((h, w, 3)).astype(np.float32)
        _save(root / "snow" / "input" / f"{i}.png", np.clip(gt + 0.2, 0, 1))
        _save(root / "snow" / "gt" / f"{i}.png", gt)
        lines.append(f"./snow/input/{i}.png")
    (root / "allweather.txt").write_text("\n".join(lines) + "\n")
    return root / "allweather.txt"


def test_allweather_list_pairs_input_with_gt(tmp_path):
    pairs = allweather_pairs(_allweather(tmp_path, [(20, 30), (25, 18)]))
    assert [p.key for p in pairs] == ["snow/input/0.png", "snow/input/1.png"]
    assert pairs[1].gt == tmp_path / "snow" / "gt" / "1.png"
    assert open_pairs(tmp_path / "allweather.txt") == pairs


def test_paired_folders_match_by_name_and_stem(tmp_path):
    rng = np.random.default_rng(1)
    for name in ("a.png", "b.png"):
        _save(tmp_path / "input" / name, rng.random((9, 9, 3)).astype(np.float32))
    _save(tmp_path / "gt" / "a.png", rng.random((9, 9, 3)).astype(np.float32))
    _save(tmp_path / "gt" / "b.jpg", rng.random((9, 9, 3)).astype(np.float32))
    pairs = paired_folder_pairs(tmp_path)
    assert [(p.input.name, p.gt.name) for p in pairs] == [("a.png", "a.png"), ("b.png", "b.jpg")]
    (tmp_path / "gt" / "b.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="b.png"):
        paired_folder_pairs(tmp_path)


def test_crops_pad_small_images_and_flip_input_and_gt_alike(tmp_path):
    ds = PairedImages(allweather_pairs(_allweather(tmp_path, [(20, 30), (10, 12)])), crop=16, seed=3)
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            assert item["input"].shape == item["gt"].shape == (3, 16, 16)
            # The inputs were made as clip(gt + 0.2): a crop or flip applied to one image only breaks it.
            torch.testing.assert_close(item["input"], (item["gt"] + 0.2).clamp(max=1), atol=1 / 255, rtol=0)
    ds.set_epoch(0)
    again = PairedImages(ds.pairs, crop=16, seed=3)
    assert torch.equal(ds[0]["input"], again[0]["input"])  # a function of (seed, epoch, index)
    whole = PairedImages(ds.pairs, crop=None)[0]
    assert whole["input"].shape == (3, 20, 30)


def test_missing_file_and_size_mismatch_name_the_paths(tmp_path):
    list_file = _allweather(tmp_path, [(20, 30), (20, 30)])
    _save(tmp_path / "snow" / "gt" / "1.png", np.zeros((21, 30, 3), np.float32))
    ds = PairedImages(allweather_pairs(list_file), crop=16)
    with pytest.raises(ValueError, match=r"snow/input/1.png.*snow/gt/1.png"):
        ds[1]
    (tmp_path / "snow" / "gt" / "0.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"snow/gt/0.png"):
        allweather_pairs(list_file)


def test_prior_cache_entries_are_looked_up_by_key(tmp_path):
    pairs = allweather_pairs(_allweather(tmp_path, [(12, 12), (12, 12)]))
    cache = {p.key: (torch.full((6,), float(i)), torch.full((512,), -float(i))) for i, p in enumerate(pairs)}
    item = PairedImages(pairs, crop=8, prior_cache=cache)[1]
    assert item["d_g"].shape == (6,) and item["d_g"][0] == 1.0 and item["P_f"][0] == -1.0
