"""m2restore_kernels._native: the C kernels are built once into a cache and skipped cleanly where they cannot be."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from m2restore_kernels import _native


@pytest.fixture(autouse=True)
def _fresh_loader():
    _native.load.cache_clear()
    yield
    _native.load.cache_clear()  # later tests load the library from the default cache again


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_builds_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("M2RESTORE_KERNELS_CACHE", str(tmp_path))
    lib = _native.load("selective_scan_cpu")
    assert lib is not None and hasattr(lib, "scan_fwd") and hasattr(lib, "scan_bwd")
    (built,) = tmp_path.glob("selective_scan_cpu-*.so")
    stamp = built.stat().st_mtime_ns
    _native.load.cache_clear()
    assert _native.load("selective_scan_cpu") is not None
    assert [p.name for p in tmp_path.iterdir()] == [built.name]  # no temporary files left behind
    assert built.stat().st_mtime_ns == stamp  # loaded, not rebuilt


def test_switched_off_by_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("M2RESTORE_KERNELS_CACHE", str(tmp_path))
    monkeypatch.setenv("M2RESTORE_NATIVE", "0")
    assert _native.load("selective_scan_cpu") is None
    assert not any(tmp_path.iterdir())


def test_a_broken_compiler_falls_back_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("M2RESTORE_KERNELS_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.warns(RuntimeWarning, match="PyTorch path"):
        assert _native.load("selective_scan_cpu") is None
    assert not any(tmp_path.glob("*.so"))


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
@pytest.mark.parametrize("name", ["moe_cpu", "selective_scan_cpu"])
def test_loading_keeps_subnormal_floats(name, tmp_path):
    """The libraries are compiled with -ffast-math; linked with it, GCC's crtfastmath.o would switch
    the loading process to flush subnormals to zero (every later PyTorch op included). A fresh
    process, as the floating-point mode is process state."""
    code = (f"import torch; from m2restore_kernels import _native; assert _native.load({name!r}) is not None; "
            "print((torch.tensor(1e-39) * 1.0).item())")
    env = {**os.environ, "M2RESTORE_KERNELS_CACHE": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout) != 0.0, "the subnormal 1e-39 was flushed to zero"
