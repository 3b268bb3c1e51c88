"""pyproject.toml's package list, package data and version against the source tree, and the
README's CPU install command against the requirements pip resolves."""
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement  # packaging: installed with scikit-image
from packaging.utils import canonicalize_name
from packaging.version import Version

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
            # what a build of either distribution leaves beside the sources (git ignores it)
            if {"__pycache__", "build"} & set(folder.parts) or folder.name.endswith(".egg-info"):
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


# ------------------------------------------------------------------ a CPU user's torch stays

def _cpu_install_command() -> list[str]:
    """The README's command for machines without an NVIDIA GPU: `pip install ... --index-url .../cpu`."""
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"`(pip install [^`]*--index-url https://download\.pytorch\.org/whl/cpu)`", readme)
    assert len(commands) == 1, "the README names one CPU install command"
    return commands[0].split()


def _installed_requirements(name: str) -> list:
    """The requirements of the installed distribution ``name`` that apply here (no extras)."""
    from importlib import metadata

    return [r for r in map(Requirement, metadata.distribution(name).requires or [])
            if r.marker is None or r.marker.evaluate({"extra": ""})]


def _our_torch_requirement() -> Requirement:
    ours = [Requirement(r) for r in PYPROJECT["project"]["dependencies"] if Requirement(r).name == "torch"]
    assert len(ours) == 1
    return ours[0]


def _narrows(requirement: Requirement, lowest: Version) -> bool:
    """Whether ``requirement`` (on torch) refuses a torch that ours, torch >= ``lowest``, accepts:
    a higher lower bound, an upper bound or an exact version."""
    return any(Version(s.version) > lowest if s.operator in (">=", ">") else s.operator != "!="
               for s in requirement.specifier)


def _torch_narrowed_by_the_install() -> tuple[set[str], set[str]]:
    """(every distribution `pip install .` brings in, as installed here; those among them whose
    requirement on torch is narrower than ours): the second, torchvision above all (each release
    requires the torch released with it, or newer), would have pip replace an older torch that
    is already installed, unless they come from the same index in the same command."""
    lowest = Version(next(iter(_our_torch_requirement().specifier)).version)
    queue = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    seen, narrowing = set(), set()
    while queue:
        req = queue.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        for sub in _installed_requirements(req.name):
            if canonicalize_name(sub.name) == "torch" and _narrows(sub, lowest):
                narrowing.add(name)
            queue.append(sub)
    return seen, narrowing


def test_the_cpu_install_command_takes_every_package_that_narrows_torch_from_the_cpu_index():
    """A CPU user installs PyTorch's CPU wheels first, then `pip install .`, which keeps what it
    finds as long as nothing it brings in asks for another torch: every distribution of the
    install whose requirement on torch is narrower than ours (torchvision, through open_clip_torch)
    must come from the CPU index in the same command, and ours is one lower bound."""
    assert [s.operator for s in _our_torch_requirement().specifier] == [">="]
    command = _cpu_install_command()
    named = {canonicalize_name(w) for w in command[2:command.index("--index-url")]}
    seen, narrowing = _torch_narrowed_by_the_install()
    assert "torch" in seen and "torch" in named
    assert narrowing <= named, f"add {sorted(narrowing - named)} to the README's CPU install command"


def test_narrower_torch_requirements_are_told_apart():
    lowest = Version("2.4")
    assert [_narrows(Requirement(r), lowest) for r in ("torch", "torch>=2.0", "torch>=2.4,!=2.5.0", "torch>=2.14.0",
                                                       "torch==2.13.0", "torch<3")] == [
        False, False, False, True, True, True]
