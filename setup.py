"""Package layout: the folder ``kernels/`` installs under the import name ``m2restore_kernels``
so that it never collides with other distributions that ship a top-level ``kernels``.
Data folders (C sources, demo weights, sample images) are listed as namespace packages so
setuptools ships them without warnings."""
from setuptools import find_namespace_packages, setup

KERNEL_OPS = ("moe", "selective_scan", "gated_fusion", "causal_conv1d")  # one subpackage per op

setup(
    packages=["m2restore_kernels", "m2restore_kernels.csrc"]
    + [f"m2restore_kernels.{op}" for op in KERNEL_OPS]
    + find_namespace_packages(include=["m2restore", "m2restore.*"], exclude=["*.__pycache__"]),
    package_dir={"m2restore_kernels": "kernels"},
    package_data={
        "m2restore_kernels.csrc": ["*.c"],  # C loops built on first use (kernels/_native.py, <op>/native_impl.py)
        "m2restore.assets.demo_tiny": ["*.json", "*.safetensors"],
        "m2restore.assets.samples": ["*.png"],
    },
)
