"""``m2restore eval``: the metrics against hand computations and scikit-image's own example,
and the Table I style report."""
import json
import math

import numpy as np
import pytest
import torch

from m2restore import M2Restore, M2RestoreConfig, NullPrior
from m2restore.cli import main
from m2restore.data.io import ImageData, write_image
from m2restore.evaluate import image_metrics, quantize


def test_psnr_by_hand():
    gt = np.zeros((4, 4, 3))
    pred = gt.copy()
    pred[1, 2, 0] = 0.5  # one error of 0.5 in 48 samples: MSE = 0.25 / 48
    assert image_metrics(pred, gt)["psnr"] == pytest.approx(10 * math.log10(48 / 0.25))


def test_ssim_of_flat_images_by_hand():
    """Flat images have zero (co)variance, so SSIM = (2·a·b + C1) / (a² + b² + C1), C1 = (0.01·L)²."""
    a, b = 0.3, 0.5
    c1 = 0.01 ** 2
    got = image_metrics(np.full((16, 16, 3), b), np.full((16, 16, 3), a))["ssim"]
    assert got == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1))


def test_ssim_matches_scikit_image_documented_camera_example():
    """scikit-image's own reference (skimage/metrics/tests, test_mssim_vs_legacy): the camera
    image against a seeded noisy copy has SSIM 0.3674518327910367 with default options. Our RGB
    SSIM of the grayscale pair repeated over three channels must give the same number."""
    from skimage import data

    rs = np.random.RandomState(5)
    cam = data.camera()
    noisy = np.clip(cam + 20.0 * rs.randn(*cam.shape), 0, 255).astype(cam.dtype)
    rgb = lambda im: np.repeat(im[..., None] / 255.0, 3, axis=-1)  # noqa: E731
    assert image_metrics(rgb(noisy), rgb(cam))["ssim"] == pytest.approx(0.3674518327910367, abs=1e-9)


def test_y_channel_is_bt601_luma():
    """On Y the metrics use BT.601 luma in [16, 235] with data range 255."""
    gt = np.full((8, 8, 3), 0.5)
    pred = gt.copy()
    pred[..., 0] += 0.1
    dy = 65.481 * 0.1  # Y = 16 + 65.481 R + 128.553 G + 24.966 B (R, G, B in [0, 1])
    assert image_metrics(pred, gt)["psnr_y"] == pytest.approx(10 * math.log10(255.0 ** 2 / dy ** 2))


@pytest.mark.filterwarnings("ignore:M2Restore has no degradation prior")
def test_eval_cli_prints_table_and_writes_csv_json(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = M2RestoreConfig.tiny(backend="torch")
    model = M2Restore(cfg, prior=NullPrior(cfg.num_degradations, cfg.prior_dim)).eval()
    model.save_pretrained(tmp_path / "w")
    rng = np.random.default_rng(0)
    sets = {}
    for name in ("Snow100K-L", "RainDrop"):
        for i in range(2):
            gt = rng.random((19, 26, 3)).astype(np.float32)
            write_image(tmp_path / name / "input" / f"{i}.png", ImageData(np.clip(gt * 0.8 + 0.15, 0, 1)))
            write_image(tmp_path / name / "gt" / f"{i}.png", ImageData(gt))
        sets[name] = tmp_path / name
    # fp32 asked for: the expectation below is computed in float32, whatever --dtype auto picks here.
    assert main(["eval", "--weights", str(tmp_path / "w"), "--backend", "torch", "--out", str(tmp_path / "res"),
                 "--dtype", "fp32", "--data", *(f"{k}={v}" for k, v in sets.items())]) == 0
    out = capsys.readouterr().out
    for label in ("Snow100K-L", "RainDrop", "Average", "PSNR↑", "SSIM↑", "RGB", "Y"):
        assert label in out
    result = json.loads((tmp_path / "res" / "metrics.json").read_text())["sets"]
    assert [r["name"] for r in result] == ["Snow100K-L", "RainDrop", "Average"]
    # Independent recomputation for one set: restore, quantise, average the per-image PSNRs.
    from m2restore.data.io import read_image

    psnrs = []
    for i in range(2):
        x = torch.from_numpy(read_image(sets["RainDrop"] / "input" / f"{i}.png").rgb).permute(2, 0, 1)[None]
        with torch.no_grad():
            y = model(x).clamp(0, 1)[0].permute(1, 2, 0).numpy()
        psnrs.append(image_metrics(quantize(y), read_image(sets["RainDrop"] / "gt" / f"{i}.png").rgb)["psnr"])
    assert result[1]["psnr"] == pytest.approx(np.mean(psnrs), rel=1e-6)
    assert result[2]["psnr"] == pytest.approx((result[0]["psnr"] + result[1]["psnr"]) / 2)
    assert (tmp_path / "res" / "metrics.csv").read_text().startswith("name,count,psnr,ssim,psnr_y,ssim_y")
    # In bf16 (autocast) the same sets score within bf16 rounding of float32.
    assert main(["eval", "--weights", str(tmp_path / "w"), "--backend", "torch", "--out", str(tmp_path / "bf16"),
                 "--dtype", "bf16", "--data", *(f"{k}={v}" for k, v in sets.items())]) == 0
    bf16 = json.loads((tmp_path / "bf16" / "metrics.json").read_text())["sets"]
    assert [r["psnr"] for r in bf16] == pytest.approx([r["psnr"] for r in result], abs=0.2)


def test_chw_view_metrics_read_the_buffer_as_the_authors_val_utils_do():
    """Their calc_psnr/calc_ssim view the (3, H, W) output as (H, W, 3) (no transpose) and take
    OpenCV's BGR luma: an error δ in the R plane alone fills the first third of the viewed rows with
    luma errors δ·(0.114 + 0.587 + 0.299) = δ, so PSNR = 10·log10(3 / δ²); the BT.601 Y of the
    RGB image sees 65.481·δ / 255 instead. SSIM is a 1-D SSIM down each column of the viewed map."""
    from skimage.metrics import structural_similarity

    from m2restore.evaluate import chw_view_metrics

    rng = np.random.default_rng(0)
    gt = rng.random((3, 12, 10))
    pred = gt.copy()
    delta = 0.05
    pred[0] += delta
    got = chw_view_metrics(pred, gt)
    assert got["psnr_y"] == pytest.approx(10 * math.log10(3 / delta ** 2))
    rgb = image_metrics(np.clip(pred, 0, 1).transpose(1, 2, 0), gt.transpose(1, 2, 0))
    assert abs(rgb["psnr_y"] - got["psnr_y"]) > 3

    pred = gt + 0.2 * rng.standard_normal(gt.shape)  # unclamped: values outside [0, 1] count
    view = lambda a: torch.from_numpy(a)[None][0].view(12, 10, 3).numpy() @ np.array([0.114, 0.587, 0.299])  # noqa: E731
    y_pred, y_gt = view(pred), view(gt)
    columns = [structural_similarity(y_gt[:, j], y_pred[:, j], data_range=1.0) for j in range(10)]
    got = chw_view_metrics(pred, gt)
    assert got["ssim_y"] == pytest.approx(np.mean(columns), rel=1e-12)
    assert got["psnr_y"] == pytest.approx(10 * math.log10(1 / np.mean((y_pred - y_gt) ** 2)), rel=1e-12)
    assert chw_view_metrics(np.clip(pred, 0, 1), gt)["psnr_y"] != pytest.approx(got["psnr_y"], abs=0.1)


@pytest.mark.filterwarnings("ignore:M2Restore has no degradation prior")
def test_eval_can_score_as_the_authors_test_does(tmp_path, capsys):
    """--resize NAME=WxH resizes that set's input and ground truth with PIL's default filter on the
    8-bit images before restoring (their RainDrop loader), --y-metric chw-view scores Y on the
    unclamped output as their val_utils.py does; the other set and the RGB row are unchanged."""
    from PIL import Image

    from m2restore.evaluate import chw_view_metrics

    torch.manual_seed(0)
    cfg = M2RestoreConfig.tiny(backend="torch")
    model = M2Restore(cfg, prior=NullPrior(cfg.num_degradations, cfg.prior_dim)).eval()
    model.save_pretrained(tmp_path / "w")
    rng = np.random.default_rng(1)
    for name in ("RainDrop", "Snow"):
        gt = rng.random((19, 26, 3)).astype(np.float32)
        write_image(tmp_path / name / "input" / "0.png", ImageData(np.clip(gt * 0.8 + 0.15, 0, 1)))
        write_image(tmp_path / name / "gt" / "0.png", ImageData(gt))
    args = ["eval", "--weights", str(tmp_path / "w"), "--backend", "torch", "--dtype", "fp32",
            "--data", f"RainDrop={tmp_path / 'RainDrop'}", f"Snow={tmp_path / 'Snow'}"]
    assert main([*args, "--out", str(tmp_path / "paper")]) == 0
    assert main([*args, "--out", str(tmp_path / "theirs"), "--resize", "RainDrop=24x16", "--y-metric", "chw-view"]) == 0
    assert "RainDrop resized to 24x16" in capsys.readouterr().out
    paper = json.loads((tmp_path / "paper" / "metrics.json").read_text())["sets"]
    theirs = json.loads((tmp_path / "theirs" / "metrics.json").read_text())
    assert theirs["protocol"] == {"y_metric": "chw-view", "resize": {"RainDrop": [24, 16]}}
    theirs = theirs["sets"]

    def load(path):  # their loader: Image.open(...).resize((w, h)), then ToTensor
        return torch.from_numpy(np.asarray(Image.open(path).resize((24, 16))) / 255.0).float().permute(2, 0, 1)

    x, gt = load(tmp_path / "RainDrop" / "input" / "0.png"), load(tmp_path / "RainDrop" / "gt" / "0.png")
    with torch.no_grad():
        out = model(x[None])[0]
    expected = chw_view_metrics(out.numpy(), gt.numpy())
    assert theirs[0]["psnr_y"] == pytest.approx(expected["psnr_y"], rel=1e-6)
    assert theirs[0]["ssim_y"] == pytest.approx(expected["ssim_y"], rel=1e-6)
    rgb = image_metrics(quantize(out.permute(1, 2, 0).numpy()), gt.permute(1, 2, 0).numpy())
    assert theirs[0]["psnr"] == pytest.approx(rgb["psnr"], rel=1e-6)
    assert theirs[1]["psnr"] == paper[1]["psnr"] and theirs[1]["psnr_y"] != paper[1]["psnr_y"]
    for bad in ("Rain=24x16", "RainDrop=24", "RainDrop=0x16"):
        assert main([*args, "--out", str(tmp_path / "x"), "--resize", bad]) == 2
        assert "--resize" in capsys.readouterr().err
