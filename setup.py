"""Build entry point; metadata lives in pyproject.toml.

Builds ``lalora_kernels._C``, the C++ CPU kernels of ``csrc/``, with ``torch.utils.cpp_extension``
when torch is importable at build time, i.e. with ``pip install --no-build-isolation`` into an
environment that already has torch (``make setup`` does this). ``LALORA_BUILD_CPP=0`` skips it; so
does a build without torch. Without ``_C`` the package runs on the reference backend and says so once.

The build is portable: its base instruction set is x86-64-v2 on x86 (the compiler's default
elsewhere), and the tile products are compiled again for AVX2 and AVX-512 and chosen at run time
(``csrc/cpu_capability.cpp``). ``LALORA_CPU_ARCH`` overrides the base ``-march`` (e.g. ``native``).
"""
import glob
import os
import platform
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
        x86 = platform.machine().lower() in ("x86_64", "amd64")
        arch = os.environ.get("LALORA_CPU_ARCH", "x86-64-v2" if x86 else "")
        flags = ["-O3", "-fopenmp"] + ([f"-march={arch}"] if arch else [])
        ext_modules = [CppExtension("lalora_kernels._C", sorted(glob.glob("csrc/*.cpp")),
                                    extra_compile_args=flags, extra_link_args=["-fopenmp"])]
        cmdclass = {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
