"""The ``lalora::`` operators, in one list: each op's schema, input check, fake, autograd and kernels.

| op | semantics | arguments |
|---|---|---|
| ``cov_update_`` | ``S += weight * X^T diag(mask) X`` (in place) | S (n, n) fp32/fp64; X (..., n) any float; mask (...) bool/0-1 or None |
| ``sqcov_update_`` | ``F += weight * (G*G)^T diag(mask) (X*X)`` (in place) | F (p, q) fp32/fp64; G (..., p); X (..., q) |
| ``packed_cov_update_`` | ``cov_update_`` on a tile-packed S (``reference.packed_format``), n = X.shape[-1] | P (packed_numel(n, tile),) fp32/fp64 |
| ``grouped_gram`` | per bundle k: ``G_k = D_k S_k D_k^T``, ``Q_k = D_k S_k`` (differentiable in D) | D flat (sum m R n,) any float; arena flat fp32/fp64/bf16 (bf16: products and outputs in fp32); classes: the class table (``gram_meta``); tile: 0 dense, else the packed layout's T |
| ``grouped_gram_quad`` | ``v = 1/2 <C, G>`` on ``grouped_gram``'s G and ``dD = dv/dD`` (returned, and used by the backward) | as ``grouped_gram``; C like G; grad: bool (False: dD empty) |
| ``grouped_gram_lowrank`` | ``grouped_gram`` on low-rank-plus-tail factors ``S = U diag(lam) U^T + rho (I - U U^T)`` (``reference.lowrank_format``) | D as above; U flat (fp32/fp64/bf16); E flat ``[rho, lam]`` per factor (fp32/fp64); classes with s_off into U; ranks: ``[k, e_off]`` per class |
| ``diag_quad`` | ``v = 1/2 sum F * D^2`` and ``FD = F * D`` (differentiable in D: ``dD = dv FD``) | F, D same shape; F fp32/fp64; D any float |

Kernels, one file per op named after it:

| op | torch: any device (``reference/``) | cpp: CPU (``csrc/``) | triton: CUDA (``triton/``) |
|---|---|---|---|
| ``cov_update_`` | ``cov_update.py`` | - (the reference is one MKL GEMM) | ``cov_update.py`` |
| ``sqcov_update_`` | ``sqcov_update.py`` | - | ``sqcov_update.py`` |
| ``packed_cov_update_`` | ``packed_cov_update.py`` | ``packed_cov_update.cpp`` | ``packed_cov_update.py`` |
| ``grouped_gram`` | ``grouped_gram.py`` | ``grouped_gram.cpp`` | ``grouped_gram.py`` |
| ``grouped_gram_quad`` | ``grouped_gram_quad.py`` | ``grouped_gram_quad.cpp`` | ``grouped_gram_quad.py`` |
| ``grouped_gram_lowrank`` | ``grouped_gram_lowrank.py`` | - (two batched GEMMs per class: MKL) | - (cuBLAS) |
| ``diag_quad`` | ``diag_quad.py`` | - | - (elementwise) |

Which kernel runs is decided at every call from the tensors' device and ``LALORA_BACKEND``:
``auto`` (default) takes Triton on CUDA and C++ on the CPU where the op has them, else the
reference; ``torch``, ``cpp`` or ``triton`` ask for one (an op without that kernel runs the
reference; ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1``, which is how CI tests every
Triton kernel). float64 never runs on Triton. ``backends()`` reports what is active. Every call
first runs the op's input check (``checks``), whatever kernel follows.

The ops are ``torch.library.custom_op``s: ``torch.compile`` keeps each as one node, traced through
its fake, and calls its kernel at run time. The backward of ``grouped_gram`` is ``dD = (dG + dG^T) Q``
per bundle: it reuses the forward's Q and never reads S again, so a penalty step reads every factor
once. The backwards treat saved products as constants, so double backward is refused.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from . import _cpp, checks
from .reference import cov_update, diag_quad as ref_diag_quad, grouped_gram as ref_gram, grouped_gram_quad as ref_quad
from .reference import grouped_gram_lowrank as ref_lowrank, packed_cov_update, sqcov_update

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:      # CPU-only installs: the reference backend serves every op
    HAS_TRITON = False

BACKENDS = ("auto", "torch", "cpp", "triton")
PREFERENCE = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}     # what ``auto`` tries, in order


@dataclass(frozen=True)
class Kernels:
    """An op's implementations: the reference (a function), the name of its C++ kernel in ``_C``,
    and ``module:function`` of its Triton launcher under ``lalora_kernels.triton``."""
    torch: Callable
    cpp: Optional[str] = None
    triton: Optional[str] = None


KERNELS = {
    "cov_update_": Kernels(cov_update.cov_update_, None, "cov_update:cov_update_"),
    "sqcov_update_": Kernels(sqcov_update.sqcov_update_, None, "sqcov_update:sqcov_update_"),
    "packed_cov_update_": Kernels(packed_cov_update.packed_cov_update_, "packed_cov_update_",
                                  "packed_cov_update:packed_cov_update_"),
    "grouped_gram": Kernels(ref_gram.grouped_gram, "grouped_gram", "grouped_gram:grouped_gram"),
    "grouped_gram_quad": Kernels(ref_quad.grouped_gram_quad, "grouped_gram_quad", "grouped_gram_quad:grouped_gram_quad"),
    "grouped_gram_lowrank": Kernels(ref_lowrank.grouped_gram_lowrank),
    "diag_quad": Kernels(ref_diag_quad.diag_quad),
}


def backend() -> str:
    """The requested backend: ``LALORA_BACKEND`` (auto | torch | cpp | triton)."""
    choice = os.environ.get("LALORA_BACKEND", "").strip().lower() or "auto"   # empty: auto
    if choice not in BACKENDS:
        raise ValueError(f"LALORA_BACKEND={choice!r} is unknown; use auto, torch, cpp or triton")
    if choice == "triton" and not HAS_TRITON:
        raise ValueError("LALORA_BACKEND=triton but triton is not installed: pip install triton")
    if choice == "cpp" and not _cpp.available():
        raise ValueError(f"LALORA_BACKEND=cpp but lalora_kernels._C is not available ({_cpp.load()}); "
                         "build it with `pip install --no-build-isolation -e .`")
    return choice


def implementation(op: str, *ts: Tensor, warn: bool = True) -> str:
    """Which implementation of ``op`` runs on these tensors: 'triton', 'cpp' or 'torch'."""
    kernels, choice = KERNELS[op], backend()
    device = ts[0].device.type
    if choice == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("LALORA_BACKEND=triton runs CPU tensors only in the Triton interpreter: set "
                         "TRITON_INTERPRET=1 before importing triton, or move the tensors to CUDA")
    usable = {"torch": True,
              "cpp": kernels.cpp is not None and device == "cpu" and _cpp.available(),
              "triton": kernels.triton is not None and HAS_TRITON and all(t.dtype != torch.float64 for t in ts)}
    if choice == "auto":
        if warn and device == "cpu" and kernels.cpp is not None and not usable["cpp"]:
            _cpp.warn_fallback()
        order = PREFERENCE.get(device, ("torch",))
    else:
        order = (choice, "torch")
    return next(name for name in order if usable[name])


def _kernel(op: str, name: str) -> Callable:
    kernels = KERNELS[op]
    if name == "cpp":
        return getattr(_cpp.module(), kernels.cpp)
    if name == "triton":
        module, fn = kernels.triton.split(":")
        return getattr(importlib.import_module(f"lalora_kernels.triton.{module}"), fn)
    return kernels.torch


def run(op: str, *args):
    """Check ``op``'s inputs, then call the implementation chosen for them."""
    getattr(checks, op)(*args)
    tensors = [a for a in args if isinstance(a, Tensor)]
    return _kernel(op, implementation(op, *tensors))(*args)


def default_storage(device, warn: bool = True) -> str:
    """'packed' where packed kernels run natively (Triton on CUDA, C++ on CPU), else 'dense'."""
    probe = torch.empty(0, device=device)
    return "packed" if implementation("grouped_gram", probe, warn=warn) in ("triton", "cpp") else "dense"


def backends() -> dict:
    """What is active: the requested backend, the implementation of the packed ops per device
    kind, and the availability of C++ (``_C``, with the instruction set its kernels run on) and
    Triton."""
    choice = backend()
    cuda = torch.cuda.is_available()
    cpu = implementation("grouped_gram", torch.empty(0), warn=False) if choice != "triton" else "triton (interpreter)"
    return {
        "requested": choice,
        "cpu": cpu,
        "cuda": implementation("grouped_gram", torch.empty(0, device="cuda"), warn=False) if cuda else None,
        "cpp": {"available": _cpp.available(), "error": _cpp.load(), "threads": torch.get_num_threads(),
                "capability": _cpp.capability()},
        "triton": {"available": HAS_TRITON, "interpret": os.environ.get("TRITON_INTERPRET") == "1"},
        "default_storage": {"cpu": default_storage("cpu", warn=False),
                            "cuda": default_storage("cuda", warn=False) if cuda else None},
    }


# ---- the ops ------------------------------------------------------------------------------------
@torch.library.custom_op("lalora::cov_update_", mutates_args={"S"})
def cov_update_(S: Tensor, X: Tensor, mask: Optional[Tensor], weight: float) -> None:
    run("cov_update_", S, X, mask, weight)


@torch.library.custom_op("lalora::sqcov_update_", mutates_args={"F"})
def sqcov_update_(F: Tensor, G: Tensor, X: Tensor, mask: Optional[Tensor], weight: float) -> None:
    run("sqcov_update_", F, G, X, mask, weight)


@torch.library.custom_op("lalora::packed_cov_update_", mutates_args={"P"})
def packed_cov_update_(P: Tensor, X: Tensor, mask: Optional[Tensor], weight: float, tile: int) -> None:
    run("packed_cov_update_", P, X, mask, weight, tile)


@torch.library.custom_op("lalora::grouped_gram", mutates_args=())
def grouped_gram(D: Tensor, arena: Tensor, classes: list[int], tile: int) -> tuple[Tensor, Tensor]:
    return run("grouped_gram", D, arena, classes, tile)


@torch.library.custom_op("lalora::grouped_gram_quad", mutates_args=())
def grouped_gram_quad(D: Tensor, arena: Tensor, classes: list[int], tile: int, C: Tensor,
                      grad: bool) -> tuple[Tensor, Tensor]:
    return run("grouped_gram_quad", D, arena, classes, tile, C, grad)


@torch.library.custom_op("lalora::grouped_gram_lowrank", mutates_args=())
def grouped_gram_lowrank(D: Tensor, U: Tensor, E: Tensor, classes: list[int], ranks: list[int]) -> tuple[Tensor, Tensor]:
    return run("grouped_gram_lowrank", D, U, E, classes, ranks)


@torch.library.custom_op("lalora::diag_quad", mutates_args=())
def diag_quad(F: Tensor, D: Tensor) -> tuple[Tensor, Tensor]:
    return run("diag_quad", F, D)


# ---- fakes: output shapes for torch.compile and the meta device ----------------------------------
@cov_update_.register_fake
def _(S, X, mask, weight):
    return None


@sqcov_update_.register_fake
def _(F, G, X, mask, weight):
    return None


@packed_cov_update_.register_fake
def _(P, X, mask, weight, tile):
    return None


@grouped_gram.register_fake
def _(D, arena, classes, tile):
    return ref_gram.gram_outputs_like(D, arena, classes)


@grouped_gram_quad.register_fake
def _(D, arena, classes, tile, C, grad):
    return ref_gram.gram_outputs_like(D, arena, classes, grad)


@grouped_gram_lowrank.register_fake
def _(D, U, E, classes, ranks):
    from .gram_meta import gram_numel
    return D.new_empty((gram_numel(classes),), dtype=E.dtype), D.new_empty(D.shape, dtype=E.dtype)


@diag_quad.register_fake
def _(F, D):
    return F.new_empty(()), torch.empty_like(F)


# ---- autograd ------------------------------------------------------------------------------------
def _first_order_only(op: str) -> None:
    """The backwards below use saved products as constants, so their own derivative would be wrong:
    refuse double backward (``create_graph=True``) instead of returning wrong second derivatives."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"lalora::{op} supports first derivatives only; differentiate the penalty "
                           "without create_graph=True (no double backward, Hessian-vector or gradient "
                           "penalties through it)")


def _grouped_gram_setup(ctx, inputs, output):
    D, classes = inputs[0], inputs[2]
    ctx.save_for_backward(output[1])
    ctx.d_dtype, ctx.classes = D.dtype, classes
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _grouped_gram_backward(ctx, dG, dQ):
    (Q,) = ctx.saved_tensors
    if dG is None:
        return (None,) * 4
    _first_order_only("grouped_gram")
    dD = ref_gram.sym_grad(dG.to(Q.dtype), Q, ctx.classes)
    return (dD.to(ctx.d_dtype),) + (None,) * 3


grouped_gram.register_autograd(_grouped_gram_backward, setup_context=_grouped_gram_setup)


def _lowrank_setup(ctx, inputs, output):
    D, classes = inputs[0], inputs[3]
    ctx.save_for_backward(output[1])
    ctx.d_dtype, ctx.classes = D.dtype, classes
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _lowrank_backward(ctx, dG, dQ):
    (Q,) = ctx.saved_tensors
    if dG is None:
        return (None,) * 5
    _first_order_only("grouped_gram_lowrank")
    return (ref_gram.sym_grad(dG.to(Q.dtype), Q, ctx.classes).to(ctx.d_dtype),) + (None,) * 4


grouped_gram_lowrank.register_autograd(_lowrank_backward, setup_context=_lowrank_setup)


def _gram_quad_setup(ctx, inputs, output):
    ctx.d_dtype, ctx.grad = inputs[0].dtype, inputs[5]
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _gram_quad_backward(ctx, dv, ddD):
    if dv is None:
        return (None,) * 6
    if not ctx.grad:
        raise RuntimeError("grouped_gram_quad was called with grad=False; pass grad=True to differentiate it")
    _first_order_only("grouped_gram_quad")
    (dD,) = ctx.saved_tensors
    return ((dv * dD).to(ctx.d_dtype),) + (None,) * 5


grouped_gram_quad.register_autograd(_gram_quad_backward, setup_context=_gram_quad_setup)


def _diag_quad_setup(ctx, inputs, output):
    ctx.d_dtype = inputs[1].dtype
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _diag_quad_backward(ctx, dv, dFD):
    (FD,) = ctx.saved_tensors
    if dv is None:
        return None, None
    _first_order_only("diag_quad")
    return None, (dv * FD).to(ctx.d_dtype)


diag_quad.register_autograd(_diag_quad_backward, setup_context=_diag_quad_setup)
