"""The ``lalora::`` operators: schemas, backend dispatch and autograd, in one list.

| op | semantics | shapes / dtypes |
|---|---|---|
| ``cov_update_`` | ``S += weight * X^T diag(mask) X`` (in place) | S (n, n) fp32/fp64; X (..., n) any float; mask (...) bool/0-1 or None |
| ``sqcov_update_`` | ``F += weight * (G*G)^T diag(mask) (X*X)`` (in place) | F (p, q) fp32/fp64; G (..., p); X (..., q) |
| ``diag_quad`` | ``v = 1/2 sum F * D^2`` and ``FD = F * D`` (differentiable in D: ``dD = dv FD``) | F, D same shape; F fp32/fp64; D any float |
| ``packed_cov_update_`` | ``cov_update_`` on a tile-packed S (``reference.packed``), n = X.shape[-1] | P (packed_numel(n, tile),) fp32/fp64 |
| ``grouped_gram`` | per item k: ``G_k = D_k S_k D_k^T``, ``Q_k = D_k S_k`` (differentiable in D) | D flat (sum R_k n_k,) any float; arena flat fp32/fp64/bf16 (bf16: products and outputs in fp32), factors dense (tile = 0) or tile-packed; tables from ``grouping.GramLayout`` |
| ``grouped_gram_quad`` | ``v = 1/2 <C, G>`` on ``grouped_gram``'s G, and ``dD = dv/dD`` (returned, and used by the backward) | as ``grouped_gram``; C like G; grad: bool (False: dD empty) |

Backends: the pure-PyTorch reference (any device, the oracle), the C++ CPU kernels of ``csrc/``
(``_C``: the packed ops) and Triton (``lalora_kernels.triton``). With ``LALORA_BACKEND`` unset
(``auto``) CUDA tensors use Triton, CPU tensors use C++ for the packed ops and the reference for
the rest (dense factors are one MKL GEMM there already). ``LALORA_BACKEND=torch``, ``=cpp`` or
``=triton`` forces one (``triton`` on CPU tensors needs ``TRITON_INTERPRET=1``). float64 never runs
on Triton. When Triton is importable the ops are ``torch.library.triton_op``s, so ``torch.compile``
traces through them into the kernels. ``backends()`` reports what is active.
``grouped_gram``'s backward is ``dD = (dG + dG^T) Q`` per item: it reuses the Q of the forward and never reads
S again, so one penalty step reads every factor exactly once.
``grouped_gram_quad`` is the kfac/tri penalty in one op: the same products with the epilogue (value
and the gradient ``dD = (W + W^T) Q``, ``W = dv/dG``) fused behind them: in C++ for packed factors
on the CPU, in the Triton product kernels (``triton.quad``) for items of at most 64 rows.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from . import _cpp, reference

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:      # CPU-only installs: the reference backend serves every op
    HAS_TRITON = False

BACKENDS = ("auto", "torch", "cpp", "triton")


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


def _kernel_for(*ts: Tensor, cpp: bool = False, warn: bool = True) -> str:
    """Which implementation runs an op on these tensors: 'triton', 'cpp' or 'torch'.
    ``cpp``: the op has a C++ CPU kernel; ``warn``: say (once) when it is unavailable."""
    choice = backend()
    if choice == "torch":
        return "torch"
    f64 = any(t.dtype == torch.float64 for t in ts)
    if choice == "triton":
        return "torch" if f64 else "triton"
    if all(t.is_cuda for t in ts):
        return "triton" if HAS_TRITON and not f64 and choice == "auto" else "torch"
    if cpp and all(t.device.type == "cpu" for t in ts):
        if choice == "cpp" or _cpp.available():
            return "cpp"
        if warn:
            _cpp.warn_fallback()
    return "torch"


def _triton_for(*ts: Tensor) -> bool:
    return _kernel_for(*ts) == "triton"


def default_storage(device, warn: bool = True) -> str:
    """'packed' where packed kernels run natively (Triton on CUDA, C++ on CPU), else 'dense'."""
    probe = torch.empty(0, device=device)
    return "packed" if _kernel_for(probe, cpp=True, warn=warn) in ("triton", "cpp") else "dense"


def backends() -> dict:
    """What is active: the requested backend, the implementation of the packed ops per device
    kind, and the availability of C++ (``_C``) and Triton."""
    choice = backend()
    cuda = torch.cuda.is_available()
    return {
        "requested": choice,
        "cpu": _kernel_for(torch.empty(0), cpp=True, warn=False) if choice != "triton" else "triton (interpreter)",
        "cuda": _kernel_for(torch.empty(0, device="cuda"), cpp=True, warn=False) if cuda else None,
        "cpp": {"available": _cpp.available(), "error": _cpp.load(), "threads": torch.get_num_threads(),
                "capability": _cpp.capability()},
        "triton": {"available": HAS_TRITON, "interpret": os.environ.get("TRITON_INTERPRET") == "1"},
        "default_storage": {"cpu": default_storage("cpu", warn=False),
                            "cuda": default_storage("cuda", warn=False) if cuda else None},
    }


def _define(name: str, mutates_args):
    if HAS_TRITON:
        return torch.library.triton_op(name, mutates_args=mutates_args)
    return torch.library.custom_op(name, mutates_args=mutates_args)


@_define("lalora::cov_update_", mutates_args={"S"})
def cov_update_(S: Tensor, X: Tensor, mask: Optional[Tensor], weight: float) -> None:
    if _triton_for(S, X):
        from .triton.accumulate import cov_update_ as kernel
        kernel(S, X, mask, weight)
    else:
        reference.cov_update_(S, X, mask, weight)


@_define("lalora::sqcov_update_", mutates_args={"F"})
def sqcov_update_(F: Tensor, G: Tensor, X: Tensor, mask: Optional[Tensor], weight: float) -> None:
    if _triton_for(F, G, X):
        from .triton.diag import sqcov_update_ as kernel
        kernel(F, G, X, mask, weight)
    else:
        reference.sqcov_update_(F, G, X, mask, weight)


@_define("lalora::packed_cov_update_", mutates_args={"P"})
def packed_cov_update_(P: Tensor, X: Tensor, mask: Optional[Tensor], weight: float, tile: int) -> None:
    kernel = _kernel_for(P, X, cpp=True)
    if kernel == "triton":
        from .triton.packed import packed_cov_update_ as triton_kernel
        triton_kernel(P, X, mask, weight, tile)
    elif kernel == "cpp":
        torch.ops.lalora_cpp.packed_cov_update_(P, X, mask, weight, tile)
    else:
        reference.packed_cov_update_(P, X, mask, weight, tile)


@_define("lalora::grouped_gram", mutates_args=())
def grouped_gram(D: Tensor, arena: Tensor, items: Tensor, work: Tensor, pairs: Tensor, plan: list[int],
                 classes: list[int], tile: int) -> tuple[Tensor, Tensor]:
    return _gram(_kernel_for(D, arena, cpp=tile > 0), D, arena, items, work, pairs, plan, classes, tile)


@_define("lalora::grouped_gram_quad", mutates_args=())
def grouped_gram_quad(D: Tensor, arena: Tensor, items: Tensor, work: Tensor, pairs: Tensor, plan: list[int],
                      classes: list[int], tile: int, C: Tensor, grad: bool) -> tuple[Tensor, Tensor]:
    kernel = _kernel_for(D, arena, cpp=tile > 0)
    if kernel == "cpp":
        return torch.ops.lalora_cpp.packed_gram_quad(D, arena, classes, tile, C, grad)
    if kernel == "triton":
        from .triton.quad import grouped_gram_quad as triton_kernel
        return triton_kernel(D.float(), arena, items, work, pairs, plan, classes, tile, C, grad)
    G, Q = _gram(kernel, D, arena, items, work, pairs, plan, classes, tile)
    return reference.gram_quad(G, Q, classes, C, grad)


def _gram(kernel: str, D: Tensor, arena: Tensor, items: Tensor, work: Tensor, pairs: Tensor, plan: list[int],
          classes: list[int], tile: int) -> tuple[Tensor, Tensor]:
    if kernel == "triton":
        if tile:
            from .triton.packed import packed_gram
            return packed_gram(D.float(), arena, items, work, pairs, plan, reference.gram_numel(classes), tile)
        from .triton.gram import grouped_gram as triton_kernel
        return triton_kernel(D.float(), arena, items, work, pairs, plan, reference.gram_numel(classes))
    if kernel == "cpp":
        return torch.ops.lalora_cpp.packed_gram(D, arena, classes, tile)
    return reference.grouped_gram(D, arena, classes, tile)


def sym_product(D: Tensor, S: Tensor, n: int, tile: int = 0) -> tuple[Tensor, Tensor]:
    """``G = D S D^T`` and ``Q = D S`` for one symmetric factor S, dense (n, n) or tile-packed
    (tile > 0), through ``grouped_gram`` (so on the active backend). D: (R, n)."""
    from .grouping import GramLayout
    R = D.shape[0]
    layout = GramLayout([(n, R, 1)], tile=tile)
    items, work, pairs, plan = (torch.tensor(t, dtype=torch.int64, device=S.device).reshape(-1, len(t[0]))
                                if i < 3 else t for i, t in enumerate(layout.tables()))
    G, Q = torch.ops.lalora.grouped_gram(D.reshape(-1), S.reshape(-1), items, work, pairs, plan,
                                         layout.flat_classes(), tile)
    return G.view(R, R), Q.view(R, n)


@_define("lalora::diag_quad", mutates_args=())
def diag_quad(F: Tensor, D: Tensor) -> tuple[Tensor, Tensor]:
    FD = F * D.to(F.dtype)
    return 0.5 * torch.dot(FD.reshape(-1), D.to(F.dtype).reshape(-1)), FD


if not HAS_TRITON:
    @cov_update_.register_fake
    def _(S, X, mask, weight):
        return None

    @sqcov_update_.register_fake
    def _(F, G, X, mask, weight):
        return None

    @diag_quad.register_fake
    def _(F, D):
        return F.new_empty(()), torch.empty_like(F)

    @packed_cov_update_.register_fake
    def _(P, X, mask, weight, tile):
        return None

    @grouped_gram.register_fake
    def _(D, arena, items, work, pairs, plan, classes, tile):
        return reference.gram_outputs_like(D, arena, classes)

    @grouped_gram_quad.register_fake
    def _(D, arena, items, work, pairs, plan, classes, tile, C, grad):
        return reference.gram_outputs_like(D, arena, classes, grad)


def _first_order_only(op: str) -> None:
    """The backwards below use saved products as constants, so their own derivative would be wrong:
    refuse double backward (``create_graph=True``) instead of returning wrong second derivatives."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"lalora::{op} supports first derivatives only; differentiate the penalty "
                           "without create_graph=True (no double backward, Hessian-vector or gradient "
                           "penalties through it)")


def _grouped_gram_setup(ctx, inputs, output):
    D, classes = inputs[0], inputs[6]
    _, Q = output
    ctx.save_for_backward(Q)
    ctx.d_dtype, ctx.classes = D.dtype, classes
    ctx.mark_non_differentiable(Q)
    ctx.set_materialize_grads(False)


def _grouped_gram_backward(ctx, dG, dQ):
    (Q,) = ctx.saved_tensors
    if dG is None:
        return (None,) * 8
    _first_order_only("grouped_gram")
    dD = reference.sym_grad(dG.to(Q.dtype), Q, ctx.classes)
    return (dD.to(ctx.d_dtype),) + (None,) * 7


grouped_gram.register_autograd(_grouped_gram_backward, setup_context=_grouped_gram_setup)


def _gram_quad_setup(ctx, inputs, output):
    ctx.d_dtype, ctx.grad = inputs[0].dtype, inputs[9]
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _gram_quad_backward(ctx, dv, ddD):
    if dv is None:
        return (None,) * 10
    if not ctx.grad:
        raise RuntimeError("grouped_gram_quad was called with grad=False; pass grad=True to differentiate it")
    _first_order_only("grouped_gram_quad")
    (dD,) = ctx.saved_tensors
    return ((dv * dD).to(ctx.d_dtype),) + (None,) * 9


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
