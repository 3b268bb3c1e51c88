"""pyproject.toml's package list, package data and version against the source tree."""
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def _folder(package: str) -> Path:
    """The source folder of an import name, through package-dir."""
    head, *rest = package.split(".")
    return ROOT / SETUPTOOLS["package-dir"].get(head, head) / Path(*rest)


def _shipped_folders() -> set[Path]:
    """Folders under m2restore/ and kernels/ that hold Python modules or listed package data."""
    patterns = {_folder(p): globs for p, globs in SETUPTOOLS["package-data"].items()}
    folders = set()
    for top in ("m2restore", "kernels"):
        for folder in [ROOT / top, *(d for d in (ROOT / top).rglob("*") if d.is_dir())]:
            if "__pycache__" in folder.parts:
                continue
            if any(folder.glob("*.py")) or any(any(folder.glob(g)) for g in patterns.get(folder, ())):
                folders.add(folder)
    return folders


def test_every_package_folder_is_listed_and_every_listed_package_exists():
    listed = {_folder(p) for p in SETUPTOOLS["packages"]}
    assert all(f.is_dir() for f in listed), sorted(str(f) for f in listed if not f.is_dir())
    data_only = {f for f in _shipped_folders() if not any(f.glob("*.py"))}
    unlisted = _shipped_folders() - listed
    assert not unlisted, f"add to [tool.setuptools] packages: {sorted(str(f.relative_to(ROOT)) for f in unlisted)}"
    assert data_only <= listed


def test_package_data_globs_match_files():
    for package, globs in SETUPTOOLS["package-data"].items():
        for pattern in globs:
            assert any(_folder(package).glob(pattern)), f"{package}: {pattern} matches nothing"


def test_version_comes_from_the_distribution_metadata():
    import m2restore

    assert m2restore.__version__ in (PYPROJECT["project"]["version"], "0+unknown")


KERNELS_PYPROJECT = tomllib.loads((ROOT / "kernels" / "pyproject.toml").read_text())


def test_kernels_distribution_ships_the_same_package_with_torch_and_triton_only():
    kernels = KERNELS_PYPROJECT["tool"]["setuptools"]
    root_kernel_packages = [p for p in SETUPTOOLS["packages"] if p.split(".")[0] == "m2restore_kernels"]
    assert kernels["packages"] == root_kernel_packages
    assert kernels["package-data"] == {
        p: g for p, g in SETUPTOOLS["package-data"].items() if p.startswith("m2restore_kernels")}
    requirements = {r.split(">")[0].split(";")[0].strip() for r in KERNELS_PYPROJECT["project"]["dependencies"]}
    assert requirements == {"torch", "triton"}
    assert KERNELS_PYPROJECT["project"]["version"] == PYPROJECT["project"]["version"]


def test_the_checkout_never_shadows_another_top_level_kernels_package(tmp_path):
    """kernels/ is a plain folder: run from the checkout, `import kernels` finds whatever
    distribution installs that name (Hugging Face's), never our sources."""
    import subprocess
    import sys

    assert not (ROOT / "kernels" / "__init__.py").exists()
    # A stand-in for another distribution's regular package named `kernels`, later on sys.path.
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("WHOSE = 'theirs'\n")
    code = "import kernels; print(getattr(kernels, 'WHOSE', 'checkout'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": f"{ROOT}:{tmp_path}", "PATH": "/usr/bin:/bin"}, check=True)
    assert out.stdout.strip() == "theirs"
