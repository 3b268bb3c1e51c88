"""``m2restore restore``: formats, sizes, alpha, bit depth, folders, tiles and errors."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from m2restore import M2Restore, M2RestoreConfig, NullPrior
from m2restore.cli import main
from m2restore.restore import (IMAGE_BYTES_PER_PIXEL, LATENT_BYTES_PER_CHANNEL, blend_windows,
                               collect_inputs, default_overlap, image_bytes, latent_map_bytes, parse_size,
                               plan_restore, receptive_radius, restore_tensor, tile_cores,
                               weight_bytes, working_set_bytes)

pytestmark = pytest.mark.filterwarnings("ignore:M2Restore has no degradation prior")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    cfg = M2RestoreConfig.tiny(backend="torch")
    path = tmp_path_factory.mktemp("weights")
    M2Restore(cfg, prior=NullPrior(cfg.num_degradations, cfg.prior_dim)).save_pretrained(path)
    return path


def _restore(weights, *args):
    return main(["restore", *map(str, args), "--weights", str(weights), "--backend", "torch", "--device", "cpu"])


def test_rgba_and_16bit_grayscale_keep_size_alpha_and_depth(weights, tmp_path):
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (37, 53, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    gray16 = rng.integers(0, 65536, (29, 41), dtype=np.uint16)
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    assert _restore(weights, tmp_path / "rgba.png", tmp_path / "gray16.png", "-o", tmp_path / "out") == 0

    out = Image.open(tmp_path / "out" / "rgba.png")
    assert out.mode == "RGBA" and out.size == (53, 37)
    np.testing.assert_array_equal(np.asarray(out)[..., 3], rgba[..., 3])
    assert not np.array_equal(np.asarray(out)[..., :3], rgba[..., :3])  # the colour went through the model

    out16 = Image.open(tmp_path / "out" / "gray16.png")
    assert out16.mode.startswith("I") and out16.size == (41, 29)
    values = np.asarray(out16)
    assert values.max() > 255 and len(np.unique(values)) > 256  # 16-bit precision, not 8-bit scaled up


def test_folders_are_walked_and_jpeg_stays_jpeg(weights, tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "in" / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "in" / "a.jpg")
    Image.fromarray(rng.integers(0, 256, (17, 9), dtype=np.uint8)).save(tmp_path / "in" / "sub" / "b.png")
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    assert _restore(weights, tmp_path / "in", "-o", tmp_path / "out") == 0
    a, b = Image.open(tmp_path / "out" / "a.jpg"), Image.open(tmp_path / "out" / "sub" / "b.png")
    assert (a.format, a.size, b.mode, b.size) == ("JPEG", (30, 20), "L", (9, 17))


def test_refuses_to_overwrite_inputs_and_duplicate_outputs(weights, tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    assert _restore(weights, tmp_path / "x.png", "-o", tmp_path) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    (tmp_path / "d").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "d" / "x.png")
    with pytest.raises(ValueError, match="both be written"):
        collect_inputs([tmp_path / "x.png", tmp_path / "d"])


class _Pointwise:
    """A per-pixel stand-in model: tiling it must reproduce the whole-image output exactly,
    so any error is in the tiling and blending, and the prior must reach every tile."""

    config = SimpleNamespace(pad_multiple=1)

    def __init__(self):
        self.priors = []

    def prior(self, x):
        return torch.ones(x.shape[0], 1), torch.zeros(x.shape[0], 1)

    def task_prompt(self, x):
        return x.mean(dim=(2, 3))

    def shared_inputs(self, x, prior=None):
        return self.prior(x) if prior is None else prior, self.task_prompt(x)

    def __call__(self, x, prior=None, task_prompt=None):
        self.priors.append(prior)
        return torch.sigmoid(3 * x - 1)


class _Reducing(torch.nn.Module):
    """Per-pixel layers, a 2× down- and upsampled branch, and pixel reductions that depend on one
    another four deep: channel attention (full resolution), channel attention on the branch
    (half resolution) followed by a scan along its rows (a whole map), then a mean and a max gate.
    Without these and the task prompt (a mean over the whole image, as the TPGS is) every tile
    would reproduce its pixels exactly, so the gap between tiled and whole output is what the
    shared statistics leave."""

    config = SimpleNamespace(pad_multiple=4)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        conv = torch.nn.Conv2d
        self.embed, self.down, self.up, self.out = conv(3, 8, 1), conv(32, 8, 1), conv(8, 32, 1), conv(8, 3, 1)
        self.temperature = torch.nn.Parameter(torch.full((2, 1, 1), 4.0))
        self.double()

    def prior(self, x):
        return torch.ones(x.shape[0], 1, dtype=x.dtype), torch.zeros(x.shape[0], 1, dtype=x.dtype)

    def task_prompt(self, x):
        return x.mean(dim=(2, 3))

    def shared_inputs(self, x, prior=None):
        h, w = x.shape[-2:]
        image = torch.nn.functional.pad(x, (0, -w % 4, 0, -h % 4), mode="replicate")
        return self.prior(x) if prior is None else prior, self.task_prompt(image)

    @staticmethod
    def scan(x):
        """A decaying running mean along the row-major pixel sequence, as a Mamba scan runs."""
        b, c, h, w = x.shape
        seq = x.reshape(b, c, h * w)
        decay = 0.97 ** torch.arange(h * w, dtype=x.dtype)
        return (torch.cumsum(seq / decay, dim=-1) * decay / (h * w) ** 0.5).reshape(b, c, h, w)

    def forward(self, x, prior=None, task_prompt=None):
        from m2restore.modules.statistics import pixel_amax, pixel_mean, whole_map
        from m2restore.modules.transformer import channel_attention

        h, w = x.shape[-2:]
        image = torch.nn.functional.pad(x, (0, -w % 4, 0, -h % 4), mode="replicate")
        prompt = self.task_prompt(image) if task_prompt is None else task_prompt
        f = self.embed(image)
        f = f + channel_attention(f, f, f, 2, self.temperature)
        half = self.down(torch.nn.functional.pixel_unshuffle(f, 2))
        half = half + channel_attention(half, half, half, 2, self.temperature)
        half = half + whole_map(half, self.scan)
        f = f + torch.nn.functional.pixel_shuffle(self.up(half), 2)
        gate = torch.sigmoid(pixel_mean(f) - pixel_amax(f))
        return torch.sigmoid(self.out(f * gate) + prompt[:, :, None, None])[:, :, :h, :w]


def test_shared_statistics_make_tiles_exact():
    """With a gathering pass per level of dependent reductions and whole maps (four), tiles give
    the whole-image output to float64 rounding; with fewer passes they do not, and without any,
    far from it."""
    model = _Reducing()
    torch.manual_seed(1)
    x = torch.rand(2, 3, 45, 70, dtype=torch.float64)
    whole = restore_tensor(model, x)
    errors = [(restore_tensor(model, x, 24, 8, stat_passes=p) - whole).abs().max().item() for p in range(5)]
    assert errors[4] < 1e-12
    assert errors[3] > 1e-9 and errors[0] > 1e3 * errors[3]
    # The scan on each tile alone (its whole map not shared) is far from the whole image's.
    assert (restore_tensor(model, x, 24, 8, stat_passes=4, share_latent=False) - whole).abs().max() > 1e-3


def test_tiled_restores_in_threads_keep_their_own_statistics():
    """Two threads restoring different images in tiles at once give what each gives alone: the
    gathering in progress belongs to the thread's context."""
    from concurrent.futures import ThreadPoolExecutor

    model = _Reducing()
    torch.manual_seed(2)
    images = [torch.rand(1, 3, 40, 60, dtype=torch.float64), torch.rand(1, 3, 40, 60, dtype=torch.float64) ** 3]
    alone = [restore_tensor(model, x, 24, 8) for x in images]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda x: restore_tensor(model, x, 24, 8), images * 3))
    for got, expected in zip(together, alone * 3):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("size,tile,overlap,multiple", [(100, 32, 8, 1), (96, 32, 16, 8), (264, 256, 64, 8),
                                                        (456, 256, 64, 8), (40, 64, 16, 8), (64, 32, 0, 8)])
def test_tile_cores_partition_the_axis(size, tile, overlap, multiple):
    """Each window's core lies inside it, on the grid of ``multiple``, at least half the shared
    stretch (rounded to the grid) from an edge it shares; the cores tile [0, size) without gaps."""
    windows = blend_windows(size, tile, overlap)
    cores = tile_cores(size, tile, overlap, multiple)
    assert len(cores) == len(windows)
    n = min(tile, size)
    covered = np.zeros(size, dtype=int)
    for k, ((start, _), (lo, hi)) in enumerate(zip(windows, cores)):
        assert 0 <= lo < hi <= n and (start + lo) % multiple == 0
        covered[start + lo:start + hi] += 1
        if k > 0:
            assert lo >= (windows[k - 1][0] + n - start) // 2 // multiple * multiple - multiple
    assert (covered == 1).all()


@pytest.mark.parametrize("shape,tile,overlap", [((45, 70), 16, 4), ((33, 17), 20, 8), ((10, 10), 16, 4)])
def test_tiles_blend_back_to_the_whole_image(shape, tile, overlap):
    x = torch.rand(1, 3, *shape, dtype=torch.float64)
    model = _Pointwise()
    torch.testing.assert_close(restore_tensor(model, x, tile, overlap), torch.sigmoid(3 * x - 1), rtol=0, atol=1e-12)
    if max(shape) > tile:
        assert len(model.priors) > 1 and all(p is not None for p in model.priors)


def test_tiled_demo_model_stays_close_to_whole():
    """Tiles share the whole image's prior, task prompt and (over the gathering passes) pixel
    reductions; the AFLB's Fourier split and the Mamba scan still see one tile. On a smooth
    photo-like image (a 4×4-upsampled random field) in 32-pixel tiles, 5 × 6 of them, the default
    passes bring the tiled output four times closer to the whole-image one than tiles reducing over
    themselves, and within 5 % of the change the network makes."""
    from m2restore.restore import DEMO_WEIGHTS, load_model

    model = load_model(DEMO_WEIGHTS)
    torch.manual_seed(0)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 20, 24), scale_factor=4, mode="bilinear")
    whole, tiled = restore_tensor(model, x), restore_tensor(model, x, tile=32)
    alone = restore_tensor(model, x, tile=32, stat_passes=0)
    assert tiled.shape == x.shape
    gap = (whole - tiled).abs().mean()
    assert gap < 0.05 * (whole - x).abs().mean() and 4 * gap < (whole - alone).abs().mean()
    with pytest.raises(ValueError, match="tile_overlap"):
        restore_tensor(model, x, tile=16, overlap=16)
    with pytest.raises(ValueError, match="stat_passes"):
        restore_tensor(model, x, tile=16, stat_passes=-1)


@pytest.mark.parametrize("size,tile,overlap", [(100, 32, 8), (97, 32, 8), (64, 32, 0), (250, 64, 16), (40, 64, 16),
                                               (33, 32, 31)])
def test_blend_windows_are_a_partition_of_unity(size, tile, overlap):
    windows = blend_windows(size, tile, overlap)
    total = np.zeros(size)
    covered = np.zeros(size, dtype=int)
    for start, weight in windows:
        w = weight.numpy()
        assert w.shape == (min(tile, size),) and (w > 0).all()
        total[start:start + len(w)] += w
        covered[start:start + len(w)] += 1
    np.testing.assert_allclose(total, 1.0, rtol=0, atol=1e-12)
    assert covered.min() >= 1 and windows[0][0] == 0 and windows[-1][0] + min(tile, size) == size


def test_blend_windows_cross_fade_as_a_raised_cosine():
    """Where two windows overlap by exactly ``overlap``, the earlier one falls as cos² and the
    later one rises as sin² of π/2 · (i + ½) / overlap (they sum to 1 without normalising)."""
    tile, overlap = 32, 8
    (s0, w0), (s1, w1), *_ = blend_windows(200, tile, overlap)
    assert s1 - s0 == tile - overlap
    i = np.arange(overlap)
    rise = np.sin(np.pi / 2 * (i + 0.5) / overlap) ** 2
    np.testing.assert_allclose(w1.numpy()[:overlap], rise, atol=1e-12)
    np.testing.assert_allclose(w0.numpy()[tile - overlap:], 1 - rise, atol=1e-12)
    np.testing.assert_allclose(w0.numpy()[:tile - overlap], 1.0, atol=1e-12)


def test_default_overlap_follows_the_receptive_field():
    tiny, paper = M2RestoreConfig.tiny(), M2RestoreConfig.paper()
    # More blocks see further: the paper network's receptive radius exceeds the tiny one's.
    assert receptive_radius(paper) > receptive_radius(tiny) > 8
    # Capped at a quarter tile, in multiples of the padding; a large tile takes the whole radius.
    assert default_overlap(tiny, 256) == 64 and default_overlap(tiny, 128) == 32
    assert default_overlap(tiny, 4096) == receptive_radius(tiny) // 8 * 8


def test_memory_sizes_and_automatic_tiles():
    sizes = [parse_size(t) for t in ("3G", "512M", "1.5GiB", "2048", "64k")]
    assert sizes == [3 * 2**30, 512 * 2**20, 1.5 * 2**30, 2048, 64 * 2**10]
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(ValueError, match="memory size"):
            parse_size(bad)
    cfg = M2RestoreConfig.tiny()
    assert working_set_bytes(cfg, 100, 100) == working_set_bytes(cfg, 104, 104)  # padded to 8
    assert image_bytes(cfg, 100, 100) == image_bytes(cfg, 104, 104) > 104 * 104 * IMAGE_BYTES_PER_PIXEL
    latent = latent_map_bytes(cfg, 1600, 2400)
    assert latent == 200 * 300 * cfg.channels(4) * LATENT_BYTES_PER_CHANNEL


def test_the_plan_counts_every_component_within_the_budget():
    """plan_restore's estimate is weights + whole-image buffers + shared latent map + one forward,
    stays within the budget whenever a tile fits, and its tile is the largest that does."""
    cfg = M2RestoreConfig.tiny()
    weights = 3 << 20
    h, w = 1600, 2400
    fixed = weights + image_bytes(cfg, h, w)
    whole = plan_restore(cfg, 100, 100, fixed + working_set_bytes(cfg, 100, 100), weights)
    assert whole.tile == 0 and not whole.share_latent
    assert whole.memory == (weights, image_bytes(cfg, 100, 100), 0, working_set_bytes(cfg, 100, 100))
    assert plan_restore(cfg, 100, 100, whole.memory.total - 1, weights).tile > 0  # one byte short: tiled
    latent = latent_map_bytes(cfg, h, w)
    for budget, shared in ((fixed + 2 * latent + (64 << 20), True), (fixed + 2 * latent - 1, False),
                           (3 << 29, True), (1 << 30, False)):
        plan = plan_restore(cfg, h, w, budget, weights)
        assert plan.share_latent == shared
        assert plan.tile % 8 == 0
        assert plan.memory == (weights, image_bytes(cfg, h, w), latent if shared else 0,
                               working_set_bytes(cfg, plan.tile, plan.tile))
        assert plan.memory.total <= budget < plan.memory.total - plan.memory.forward + working_set_bytes(
            cfg, plan.tile + 8, plan.tile + 8)
    # Without gathering passes nothing is shared, and the tile takes the latent map's share.
    assert not plan_restore(cfg, h, w, 3 << 29, weights, stat_passes=0).share_latent
    # A budget the weights and whole-image buffers alone exceed: the smallest tile, over the budget.
    tight = plan_restore(cfg, h, w, fixed // 2, weights)
    assert tight.tile == 32 and tight.memory.total > fixed // 2
    # An asked-for tile is kept, and its forward counted.
    asked = plan_restore(cfg, h, w, 3 << 29, weights, tile=256)
    assert asked.tile == 256 and asked.memory.forward == working_set_bytes(cfg, 256, 256)


def test_weight_bytes_counts_parameters_and_buffers():
    model = torch.nn.BatchNorm2d(5).double()  # 10 parameters, 10 + 1 buffers (running stats, count)
    assert weight_bytes(model) == (10 + 10) * 8 + 8


def test_bf16_restore_runs_under_autocast_and_stays_close(weights, tmp_path):
    """``--dtype bf16`` runs the network in bf16 (CPU autocast): the 8-bit result differs from the
    float32 one somewhere, and by no more than bf16 rounding explains."""
    rgb = np.random.default_rng(5).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "in.png")
    outs = {}
    for dtype in ("fp32", "bf16"):
        assert _restore(weights, tmp_path / "in.png", "-o", tmp_path / dtype, "--dtype", dtype) == 0
        outs[dtype] = np.asarray(Image.open(tmp_path / dtype / "in.png")).astype(np.int32)
    diff = np.abs(outs["bf16"] - outs["fp32"])
    assert diff.max() > 0 and diff.mean() < 2.0


def test_restore_tensor_keeps_the_input_dtype_under_autocast(weights):
    from m2restore.restore import autocast, load_model

    model = load_model(weights, "cpu", "torch")
    x = torch.rand(1, 3, 20, 28)
    with autocast(torch.device("cpu"), "bf16"):
        whole, tiled = restore_tensor(model, x), restore_tensor(model, x, tile=16, overlap=4)
    assert whole.dtype == tiled.dtype == torch.float32
    torch.testing.assert_close(whole, restore_tensor(model, x), atol=0.03, rtol=0)
