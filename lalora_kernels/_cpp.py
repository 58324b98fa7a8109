"""Loads ``lalora_kernels._C``, the C++ CPU kernels of ``csrc/`` (plain functions that the ``lalora::``
ops call on the CPU; see ``ops``).

The extension is built by ``setup.py`` when torch is importable at build time
(``pip install --no-build-isolation``; ``LALORA_BUILD_CPP=0`` skips it). When it is missing or fails
to load, the CPU runs the packed ops on the pure-PyTorch reference and ``warn_fallback`` says so
once, with the reason and the fix.
"""
from __future__ import annotations

import warnings
from typing import Optional

_state: dict = {}


def load() -> Optional[str]:
    """Import ``_C`` once; returns None on success, else why it is unavailable."""
    if "error" not in _state:
        try:
            from . import _C
            _state["module"], _state["error"] = _C, None
        except Exception as exc:                       # missing, or built against another torch
            _state["error"] = f"{type(exc).__name__}: {exc}"
    return _state["error"]


def available() -> bool:
    return load() is None


def module():
    """The loaded ``_C`` (call only when ``available()``)."""
    load()
    return _state["module"]


def capability() -> Optional[str]:
    """The instruction set the C++ kernels run on ('avx512', 'avx2' or 'default'; capped by
    LALORA_CPU_CAPABILITY or ATEN_CPU_CAPABILITY), or None without ``_C``."""
    return module().cpu_capability() if available() else None


class CppFallbackWarning(UserWarning):
    """The C++ CPU kernels are unavailable; the reference backend runs instead."""


def warn_fallback() -> None:
    if _state.get("warned"):
        return
    _state["warned"] = True
    warnings.warn(
        "lalora_kernels._C (the C++ CPU kernels) is not available, so CPU work runs on the slower "
        f"pure-PyTorch reference backend ({load()}). Build it with torch installed: `pip install "
        "--no-build-isolation -e .` (or `make setup`); set LALORA_BACKEND=torch to choose the "
        "reference deliberately and silence this warning.", CppFallbackWarning, stacklevel=4)
