"""Kept for tools that look for a setup.py; the whole build configuration is in pyproject.toml."""
from setuptools import setup

setup()
