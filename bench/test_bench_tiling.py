"""Tiled against whole-image restoration on real photos, with the shipped demo weights.

Group ``tiling``: scikit-image's photos (astronaut, coffee, chelsea, rocket) resized to 720×480,
restored whole and in 256×256 tiles (the default overlap, raised-cosine blending, the whole image's
prior and task prompt), with the default gathering passes of the pixel reductions and, for
comparison, with none (each tile reducing over itself). ``extra_info`` holds the mean and largest
absolute difference in 8-bit levels (x/255); the default passes must keep the mean within 1/255.
``--quick``: one photo at 240×160 in 64×64 tiles, default passes only.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from m2restore.restore import DEFAULT_STAT_PASSES

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def pytest_generate_tests(metafunc):
    quick = metafunc.config.getoption("--quick")
    if "photo" in metafunc.fixturenames:
        metafunc.parametrize("photo", PHOTOS[:1] if quick else PHOTOS)
    if "stat_passes" in metafunc.fixturenames:
        metafunc.parametrize("stat_passes", [DEFAULT_STAT_PASSES] if quick else [0, DEFAULT_STAT_PASSES])


@pytest.mark.benchmark(group="tiling")
def test_tiled_vs_whole_on_photos(benchmark, quick, photo, stat_passes):
    from skimage import data, transform

    from m2restore.restore import DEMO_WEIGHTS, load_model, restore_tensor

    (h, w), tile = ((160, 240), 64) if quick else ((480, 720), 256)
    image = transform.resize(getattr(data, photo)(), (h, w), anti_aliasing=True).astype(np.float32)
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    model = load_model(DEMO_WEIGHTS)
    whole = restore_tensor(model, x)
    tiled = benchmark.pedantic(restore_tensor, args=(model, x, tile), kwargs={"stat_passes": stat_passes},
                               rounds=1, iterations=1)
    diff = ((whole - tiled).abs() * 255).double()
    benchmark.extra_info.update(photo=photo, h=h, w=w, tile=tile, stat_passes=stat_passes,
                                mean_diff_255=diff.mean().item(), max_diff_255=diff.max().item(),
                                network_change_255=((whole - x).abs() * 255).mean().item())
    assert tiled.shape == x.shape
    if stat_passes == DEFAULT_STAT_PASSES:
        assert diff.mean() <= 1.0
