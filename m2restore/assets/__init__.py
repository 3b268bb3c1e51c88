"""Files that ship with the package: the demo model's weights and the degraded samples it restores.

A module without torch, so that the command line's parsers can show these paths as defaults.
"""
from pathlib import Path

_HERE = Path(__file__).resolve().parent
#: The tiny demo model (config.json, model.safetensors), trained by ``m2restore demo --train``.
DEMO_WEIGHTS = _HERE / "demo_tiny"
#: Synthetic degraded images that ``m2restore demo`` restores (written by :func:`m2restore.demo.write_samples`).
SAMPLES = _HERE / "samples"
