"""Tiled against whole-image restoration on real photos, with the shipped demo weights.

Group ``tiling``: scikit-image's photos (astronaut, coffee, chelsea, rocket) resized to 720×480,
restored whole and in 256×256 tiles (the default overlap, raised-cosine blending, the prior of the
whole image); ``extra_info`` holds the mean and largest absolute difference in 8-bit levels (x/255).
``--quick``: one photo at 240×160 in 64×64 tiles.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def pytest_generate_tests(metafunc):
    if "photo" in metafunc.fixturenames:
        metafunc.parametrize("photo", PHOTOS[:1] if metafunc.config.getoption("--quick") else PHOTOS)


@pytest.mark.benchmark(group="tiling")
def test_tiled_vs_whole_on_photos(benchmark, quick, photo):
    from skimage import data, transform

    from m2restore.restore import DEMO_WEIGHTS, load_model, restore_tensor

    (h, w), tile = ((160, 240), 64) if quick else ((480, 720), 256)
    image = transform.resize(getattr(data, photo)(), (h, w), anti_aliasing=True).astype(np.float32)
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    model = load_model(DEMO_WEIGHTS)
    whole = restore_tensor(model, x)
    tiled = benchmark.pedantic(restore_tensor, args=(model, x, tile), rounds=1, iterations=1)
    diff = ((whole - tiled).abs() * 255).double()
    benchmark.extra_info.update(photo=photo, h=h, w=w, tile=tile, mean_diff_255=diff.mean().item(),
                                max_diff_255=diff.max().item(),
                                network_change_255=((whole - x).abs() * 255).mean().item())
    assert tiled.shape == x.shape
