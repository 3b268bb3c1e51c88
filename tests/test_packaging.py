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
