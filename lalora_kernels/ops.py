"""The ``lalora::`` operators: schemas, backend dispatch and autograd, in one list.

| op | semantics | shapes / dtypes |
|---|---|---|
| ``cov_update_`` | ``S += weight * X^T diag(mask) X`` (in place) | S (n, n) fp32/fp64; X (..., n) any float; mask (...) bool/0-1 or None |
| ``sqcov_update_`` | ``F += weight * (G*G)^T diag(mask) (X*X)`` (in place) | F (p, q) fp32/fp64; G (..., p); X (..., q) |
| ``diag_quad`` | ``v = 1/2 sum F * D^2`` and ``FD = F * D`` (differentiable in D: ``dD = dv FD``) | F, D same shape; F fp32/fp64; D any float |
| ``grouped_gram`` | per item k: ``G_k = D_k S_k D_k^T``, ``Q_k = D_k S_k`` (differentiable in D) | D flat (sum R_k n_k,) any float; arena flat (sum n_k^2,) fp32/fp64; tables from ``grouping.GramLayout`` |

Backends: the pure-PyTorch reference (any device) and Triton (``lalora_kernels.triton``). With
``LALORA_BACKEND`` unset (``auto``) CUDA tensors use Triton and everything else the reference;
``LALORA_BACKEND=torch`` or ``=triton`` forces one (``triton`` on CPU tensors needs
``TRITON_INTERPRET=1``). float64 inputs always run on the reference. When Triton is importable the ops are
``torch.library.triton_op``s, so ``torch.compile`` traces through them into the kernels.
``grouped_gram``'s backward is ``dD = (dG + dG^T) Q`` per item: it reuses the Q of the forward and never reads
S again, so one penalty step reads every factor exactly once.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from . import reference

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:      # CPU-only installs: the reference backend serves every op
    HAS_TRITON = False

BACKENDS = ("auto", "torch", "triton")


def backend() -> str:
    """The requested backend: ``LALORA_BACKEND`` (auto | torch | triton)."""
    choice = os.environ.get("LALORA_BACKEND", "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"LALORA_BACKEND={choice!r} is unknown; use auto, torch or triton")
    if choice == "triton" and not HAS_TRITON:
        raise ValueError("LALORA_BACKEND=triton but triton is not installed: pip install triton")
    return choice


def _triton_for(*ts: Tensor) -> bool:
    choice = backend()
    if choice == "torch" or not HAS_TRITON:
        return False
    if any(t.dtype == torch.float64 for t in ts):
        return False
    return choice == "triton" or all(t.is_cuda for t in ts)


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


@_define("lalora::grouped_gram", mutates_args=())
def grouped_gram(D: Tensor, arena: Tensor, items: Tensor, work: Tensor, pairs: Tensor, plan: list[int],
                 classes: list[int]) -> tuple[Tensor, Tensor]:
    if _triton_for(D, arena):
        from .triton.gram import grouped_gram as kernel
        g_size = sum(classes[c + 1] ** 2 * classes[c + 2] for c in range(0, len(classes), 6))
        return kernel(D.to(arena.dtype), arena, items, work, pairs, plan, g_size)
    return reference.grouped_gram(D, arena, classes)


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

    @grouped_gram.register_fake
    def _(D, arena, items, work, pairs, plan, classes):
        g_size = sum(classes[c + 1] ** 2 * classes[c + 2] for c in range(0, len(classes), 6))
        return D.new_empty((g_size,), dtype=arena.dtype), D.new_empty(D.shape, dtype=arena.dtype)


def _grouped_gram_setup(ctx, inputs, output):
    D, classes = inputs[0], inputs[-1]
    _, Q = output
    ctx.save_for_backward(Q)
    ctx.d_dtype, ctx.classes = D.dtype, classes
    ctx.mark_non_differentiable(Q)
    ctx.set_materialize_grads(False)


def _grouped_gram_backward(ctx, dG, dQ):
    (Q,) = ctx.saved_tensors
    if dG is None:
        return (None,) * 7
    dG = dG.to(Q.dtype)
    dD = torch.cat([torch.bmm(g + g.transpose(1, 2), q).reshape(-1) for g, q in
                    zip(reference.class_views(dG, ctx.classes, "G"), reference.class_views(Q, ctx.classes, "D"))])
    return (dD.to(ctx.d_dtype),) + (None,) * 6


grouped_gram.register_autograd(_grouped_gram_backward, setup_context=_grouped_gram_setup)


def _diag_quad_setup(ctx, inputs, output):
    ctx.d_dtype = inputs[1].dtype
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _diag_quad_backward(ctx, dv, dFD):
    (FD,) = ctx.saved_tensors
    return None, None if dv is None else (dv * FD).to(ctx.d_dtype)


diag_quad.register_autograd(_diag_quad_backward, setup_context=_diag_quad_setup)
