"""DA-CLIP's prior pass alone: images -> (d_g, P_f), once per restored image.

Group ``prior``: a random-weight DA-CLIP of the real size (open_clip ``ViT-B-32``: the controller
and the frozen vision tower, 12 blocks of width 768 each, at 224×224 after CLIP's resize and crop),
fed 224² and 1024² images so the resize's share shows. On CUDA the towers run under the prior's own
float16 autocast. ``--quick`` uses the tiny open_clip config of ``m2restore.benchmark``.
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch

from m2restore.benchmark import make_inputs, make_prior
from m2restore_kernels.testing import assert_close_rel

pytest.importorskip("open_clip", reason="the DA-CLIP prior needs open_clip_torch")


def pytest_generate_tests(metafunc):
    if "size" in metafunc.fixturenames:
        metafunc.parametrize("size", [64] if metafunc.config.getoption("--quick") else [224, 1024])


@pytest.fixture(scope="module")
def prior(device, quick):
    return make_prior("tiny" if quick else "paper", device)


@pytest.mark.benchmark(group="prior")
def test_daclip_prior(bench, benchmark, prior, device, size):
    inputs = make_inputs(size, device, 4 if device.type == "cuda" else 2)
    rotation = itertools.cycle(inputs)

    def call():
        with torch.inference_mode():
            return prior(next(rotation))

    d_g, p_f = bench(call)
    benchmark.extra_info.update(size=size, clip_image_size=prior.image_size)
    assert d_g.shape == (1, len(prior.names)) and p_f.shape == (1, prior.embed_dim)
    torch.testing.assert_close(d_g.sum(-1), torch.ones(1, device=device))
    # One input again, against a float64 copy of the prior (autocast leaves float64 tensors alone).
    with torch.inference_mode():
        got = prior(inputs[0])
        expected = copy.deepcopy(prior).double()(inputs[0].double())
    dtype = torch.float16 if device.type == "cuda" else torch.float32  # the towers' compute dtype
    for name, g, e in zip(("d_g", "P_f"), got, expected):
        assert_close_rel(g, e, "daclip_prior", dtype, name)
