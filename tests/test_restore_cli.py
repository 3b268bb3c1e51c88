"""``m2restore restore`` run as a user runs it, in a subprocess: exit status, the one-line messages,
no traceback, the files written. Uses the shipped demo weights on tiny images."""
import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from m2restore.data.io import read_image
from m2restore.restore import (DEFAULT_STAT_PASSES, DEMO_WEIGHTS, image_bytes, latent_map_bytes, load_model,
                               plan_restore, restore_tensor, weight_bytes, working_set_bytes)


def _run(*args, tty=False):
    """(exit status, stderr) of ``python -m m2restore restore ARGS`` on the CPU; with ``tty`` its
    stderr is a terminal (as progress bars need)."""
    cmd = [sys.executable, "-m", "m2restore", "restore", *map(str, args), "--device", "cpu"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    if not tty:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        return proc.returncode, proc.stderr
    master, slave = pty.openpty()
    # A new pty is 0 columns wide, and tqdm cuts its bar to the width: make it a terminal's 80.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # the pty reports EIO once the child closed it
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=600), b"".join(chunks).decode(errors="replace")


def _one_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def _image(path, size=(24, 40), seed=0, **save):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path, **save)


def _usage_cases(tmp_path):
    _image(tmp_path / "x.png")
    (tmp_path / "empty").mkdir()
    x, out = tmp_path / "x.png", tmp_path / "out"
    cases = [
        ([tmp_path / "nothere.png", "-o", out], "input not found: " + str(tmp_path / "nothere.png")),
        ([tmp_path / "empty", "-o", out], "no images in the folder"),
        ([x, "-o", tmp_path], "would overwrite the input"),
        ([x, "-o", out, "--tile", "-8"], "--tile -8"),
        ([x, "-o", out, "--tile", "12"], "multiple of 8"),
        ([x, "-o", out, "--tile", "64", "--tile-overlap", "64"], "--tile-overlap 64"),
        ([x, "-o", out, "--tile-overlap", "-1"], "--tile-overlap -1"),
        ([x, "-o", out, "--max-memory", "lots"], "--max-memory"),
        ([x, "-o", out, "--weights", tmp_path / "empty"], "--weights"),
    ]
    if not torch.cuda.is_available():
        cases.append(([x, "-o", out, "--device", "cuda"], "--device cuda"))
    return cases


def test_usage_mistakes_are_one_line_with_exit_status_2(tmp_path, capsys):
    from m2restore.cli import main

    for args, expected in _usage_cases(tmp_path):
        status = main(["restore", *map(str, args), "--device", "cpu"] if "--device" not in args
                      else ["restore", *map(str, args)])
        line = _one_line(capsys.readouterr().err)
        assert status == 2 and line.startswith("m2restore restore: ") and expected in line, (args, line)
    assert not (tmp_path / "out").exists()


def test_usage_mistakes_in_a_subprocess_have_no_traceback(tmp_path):
    """The same, as a user runs it: two of the cases above in a real process."""
    cases = _usage_cases(tmp_path)
    for args, expected in (cases[0], cases[4]):
        status, stderr = _run(*args)
        line = _one_line(stderr)
        assert status == 2 and line.startswith("m2restore restore: ") and expected in line, (args, stderr)


def _icc_srgb() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def test_bad_files_are_reported_and_the_rest_restored_with_metadata(tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    exif = Image.Exif()
    exif[0x010F] = "M2Restore test camera"  # Make
    exif[0x0131] = "pytest"  # Software
    icc = _icc_srgb()
    _image(src / "a.jpg", seed=1, exif=exif.tobytes(), icc_profile=icc)
    (src / "b_bad.png").write_bytes(b"this is not an image")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (src / "c_trunc.jpg").write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    _image(src / "d.webp", seed=3, lossless=True)
    _image(src / "sub" / "e.tif", seed=4)
    _image(src / "f.bmp", seed=5)
    gray16 = np.random.default_rng(6).integers(0, 65536, (20, 28), dtype=np.uint16)
    Image.fromarray(gray16).save(src / "g16.png")

    status, stderr = _run(src, "-o", tmp_path / "out", "--quiet")
    assert status == 1 and "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert lines[-1] == (f"m2restore restore: restored 5 of 7 into {(tmp_path / 'out').resolve()}; failed: "
                         "b_bad.png (not an image), c_trunc.jpg (truncated or corrupt)")
    assert any("b_bad.png" in line for line in lines[:-1]) and any("c_trunc.jpg" in line for line in lines[:-1])

    out = tmp_path / "out"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "a.jpg", "d.webp", "f.bmp", "g16.png", "sub/e.tif"]
    for name, fmt in (("a.jpg", "JPEG"), ("d.webp", "WEBP"), ("f.bmp", "BMP"), ("sub/e.tif", "TIFF")):
        with Image.open(out / name) as im:
            assert (im.format, im.size) == (fmt, (40, 24))
    with Image.open(out / "a.jpg") as im:
        back = im.getexif()
        assert back[0x010F] == "M2Restore test camera" and back[0x0131] == "pytest"
        assert im.info["icc_profile"] == icc
    g16 = read_image(out / "g16.png")
    assert g16.bit_depth == 16 and g16.grayscale and g16.rgb.shape == (20, 28, 3)


def test_16bit_colour_png_keeps_its_icc_profile(tmp_path):
    """16-bit colour PNGs go through the package's own PNG codec, which writes an iCCP chunk."""
    from m2restore.data.io import ImageData, write_image

    icc = _icc_srgb()
    rgb = np.random.default_rng(7).random((12, 10, 3)).astype(np.float32)
    write_image(tmp_path / "c16.png", ImageData(rgb, bit_depth=16, icc_profile=icc))
    status, stderr = _run(tmp_path / "c16.png", "-o", tmp_path / "out")
    assert status == 0 and "Traceback" not in stderr
    back = read_image(tmp_path / "out" / "c16.png")
    assert back.bit_depth == 16 and back.icc_profile == icc
    with Image.open(tmp_path / "out" / "c16.png") as im:
        assert im.info["icc_profile"] == icc  # Pillow reads the chunk too


def test_memory_budget_tiles_on_its_own(tmp_path):
    """With --max-memory below the image's estimated working set, the command restores in the tiles
    plan_restore picks: the output equals restore_tensor with that plan, and differs from the whole."""
    _image(tmp_path / "big.png", size=(72, 96), seed=8)
    model = load_model(DEMO_WEIGHTS)
    # The weights and whole-image buffers, and the activations of a 40×40 image.
    budget = weight_bytes(model) + image_bytes(model.config, 72, 96) + working_set_bytes(model.config, 40, 40)
    status, stderr = _run(tmp_path / "big.png", "-o", tmp_path / "out", "--max-memory", str(budget))
    assert status == 0 and "Traceback" not in stderr

    plan = plan_restore(model.config, 72, 96, budget, weight_bytes(model))
    assert 0 < plan.tile < 72 and plan.memory.total <= budget
    x = torch.from_numpy(read_image(tmp_path / "big.png").rgb).permute(2, 0, 1)[None]
    expected = {}
    for name, t in (("tiled", plan.tile), ("whole", 0)):
        y = restore_tensor(model, x, t, share_latent=plan.share_latent)[0].permute(1, 2, 0).numpy()
        expected[name] = np.rint(y * 255).astype(np.int32)
    got = np.asarray(Image.open(tmp_path / "out" / "big.png")).astype(np.int32)
    assert np.abs(got - expected["tiled"]).max() <= 1  # threads may reorder float sums by an ulp
    assert np.abs(got - expected["whole"]).max() > 1


def test_stat_passes_reach_the_tiles(tmp_path, capsys):
    """--stat-passes N gives restore_tensor's output with N gathering passes (0 differs from the
    default); a count below 0 is a usage error naming the option."""
    from m2restore.cli import main

    _image(tmp_path / "x.png", size=(64, 96), seed=10)
    model = load_model(DEMO_WEIGHTS)
    x = torch.from_numpy(read_image(tmp_path / "x.png").rgb).permute(2, 0, 1)[None]
    outputs = {}
    for passes in (0, DEFAULT_STAT_PASSES):
        args = ["restore", str(tmp_path / "x.png"), "-o", str(tmp_path / str(passes)), "--tile", "32",
                "--stat-passes", str(passes), "--device", "cpu", "--quiet", "--dtype", "fp32"]  # as computed below
        assert main(args) == 0
        got = np.asarray(Image.open(tmp_path / str(passes) / "x.png")).astype(np.int32)
        expected = np.rint(restore_tensor(model, x, 32, stat_passes=passes)[0].permute(1, 2, 0).numpy() * 255)
        assert np.abs(got - expected).max() <= 1  # threads may reorder float sums by an ulp
        outputs[passes] = got
    assert np.abs(outputs[0] - outputs[DEFAULT_STAT_PASSES]).max() > 1
    with pytest.raises(SystemExit) as exit_info:
        main(["restore", str(tmp_path / "x.png"), "-o", str(tmp_path / "bad"), "--stat-passes", "-1"])
    assert exit_info.value.code == 2 and "--stat-passes" in capsys.readouterr().err.strip().splitlines()[-1]


def test_verbose_says_how_each_image_was_tiled(tmp_path, capsys):
    from m2restore.cli import main

    _image(tmp_path / "x.png", size=(64, 96), seed=11)
    common = [str(tmp_path / "x.png"), "--device", "cpu", "--quiet", "--dtype", "fp32"]
    assert main(["-v", "restore", *common, "-o", str(tmp_path / "a"), "--tile", "32"]) == 0
    assert (f"x.png: 32-pixel tiles, {DEFAULT_STAT_PASSES} gathering passes, latent stage shared on the whole map"
            in capsys.readouterr().err)
    # A budget below twice the latent map's estimate: each tile runs its own latent stage.
    tight = str(2 * latent_map_bytes(load_model(DEMO_WEIGHTS).config, 64, 96) - 1)
    assert main(["-v", "restore", *common, "-o", str(tmp_path / "b"), "--tile", "32", "--max-memory", tight]) == 0
    assert "latent stage per tile" in capsys.readouterr().err
    assert main(["-v", "restore", *common, "-o", str(tmp_path / "c")]) == 0
    assert "x.png: whole" in capsys.readouterr().err


def test_tile_progress_on_a_terminal_and_quiet(tmp_path):
    _image(tmp_path / "x.png", size=(64, 96), seed=9)
    status, stderr = _run(tmp_path / "x.png", "-o", tmp_path / "a", "--tile", "32", "--tile-overlap", "8", tty=True)
    assert status == 0 and "Traceback" not in stderr
    # 3 × 4 tiles of 32 with stride 24, each run once per gathering pass and once for the output
    assert "x.png" in stderr and f"/{12 * (DEFAULT_STAT_PASSES + 1)}" in stderr and "tile" in stderr
    status, stderr = _run(tmp_path / "x.png", "-o", tmp_path / "b", "--tile", "32", "--tile-overlap", "8",
                          "--quiet", tty=True)
    assert status == 0 and "tile" not in stderr and (tmp_path / "b" / "x.png").is_file()
    status, stderr = _run(tmp_path / "x.png", "-o", tmp_path / "c", "--tile", "32")  # stderr not a TTY
    # No bar, but plain lines (tests/test_progress.py checks their throttle): at least the closing one.
    assert status == 0 and "x.png (1/1): restored in " in stderr.splitlines()[-1] and "\r" not in stderr
