"""Build entry point. Metadata lives in pyproject.toml; this file exists so that native
extensions (the C++ CPU ops of ``csrc/``) can be added to the build with
``torch.utils.cpp_extension`` when they land."""
from setuptools import setup

setup()
