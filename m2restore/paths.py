"""Image files by name: which files are images, the images under a folder, and the outputs
``m2restore restore`` writes for its inputs.

A module without torch, numpy or Pillow, so that the command line checks its paths before any
heavy import (:mod:`m2restore.data.io` reads and writes the files themselves).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def find_images(root: str | Path) -> list[Path]:
    """Image files (by :data:`IMAGE_EXTENSIONS`) under ``root``, recursively, sorted by path; [] when
    ``root`` is not a folder."""
    return sorted(p for p in Path(root).rglob("*") if p.is_file() and is_image_file(p))


def collect_inputs(inputs: Iterable[str | Path]) -> list[tuple[Path, Path]]:
    """(image file, its output path relative to OUTDIR) for files and folders (recursive).

    A missing path raises FileNotFoundError, a file that is not an image by its extension or a
    folder without images ValueError, two inputs bound for the same output ValueError.
    """
    found: list[tuple[Path, Path]] = []
    for item in map(Path, inputs):
        if item.is_dir():
            images = find_images(item)
            if not images:
                raise ValueError(f"no images in the folder {item} (looked for {', '.join(IMAGE_EXTENSIONS)})")
            found += [(p, p.relative_to(item)) for p in images]
        elif item.is_file():
            if not is_image_file(item):
                raise ValueError(f"{item} is not an image file by its extension ({', '.join(IMAGE_EXTENSIONS)})")
            found.append((item, Path(item.name)))
        else:
            raise FileNotFoundError(f"input not found: {item}")
    seen: dict[Path, Path] = {}
    for src, rel in found:
        if rel in seen:
            raise ValueError(f"{src} and {seen[rel]} would both be written to {rel}")
        seen[rel] = src
    return found
