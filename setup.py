"""Build entry point; metadata lives in pyproject.toml.

Builds ``lalora_kernels._C``, the C++ CPU kernels of ``csrc/``, with ``torch.utils.cpp_extension``
when torch is importable at build time, i.e. with ``pip install --no-build-isolation`` into an
environment that already has torch (``make setup`` does this). ``LALORA_BUILD_CPP=0`` skips it; so
does a build without torch. Without ``_C`` the package runs on the reference backend and says so once.
``LALORA_CPU_ARCH`` sets the ``-march`` of the build (default ``native``: the build machine's ISA).
"""
import os
import sys

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("LALORA_BUILD_CPP", "1") != "0":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("lalora_kernels: torch is not importable at build time, so the C++ CPU ops (_C) are not "
              "built; install torch first and use `pip install --no-build-isolation`", file=sys.stderr)
    else:
        arch = os.environ.get("LALORA_CPU_ARCH", "native")
        ext_modules = [CppExtension("lalora_kernels._C", ["csrc/packed_ops.cpp"],
                                    extra_compile_args=["-O3", f"-march={arch}", "-fopenmp"],
                                    extra_link_args=["-fopenmp"])]
        cmdclass = {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
