"""Package layout: the folder ``kernels/`` installs under the import name ``m2restore_kernels``
so that it never collides with other distributions that ship a top-level ``kernels``."""
from setuptools import find_packages, setup

setup(
    packages=["m2restore_kernels"] + find_packages(include=["m2restore", "m2restore.*"]),
    package_dir={"m2restore_kernels": "kernels"},
    package_data={
        "m2restore_kernels": ["csrc/*.c"],  # C loops built on first use (kernels/_native.py)
        "m2restore": ["assets/demo_tiny/*.json", "assets/demo_tiny/*.safetensors", "assets/samples/*.png"],
    },
)
