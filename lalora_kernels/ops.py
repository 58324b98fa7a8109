"""The ``lalora::`` operators: schemas, backend dispatch and autograd, in one list.

| op | semantics | shapes / dtypes |
|---|---|---|
| ``cov_update_`` | ``S += weight * X^T diag(mask) X`` (in place) | S (n, n) fp32/fp64; X (..., n) any float; mask (...) bool/0-1 or None |
| ``sqcov_update_`` | ``F += weight * (G*G)^T diag(mask) (X*X)`` (in place) | F (p, q) fp32/fp64; G (..., p); X (..., q) |
| ``sym_gram`` | ``G = D S D^T``, ``Q = D S`` (batched; differentiable in D) | D (b, R, n) any float; S (b, n, n) symmetric fp32/fp64 |

Backends: the pure-PyTorch reference (any device) and Triton (``lalora_kernels.triton``). With
``LALORA_BACKEND`` unset (``auto``) CUDA tensors use Triton and everything else the reference;
``LALORA_BACKEND=torch`` or ``=triton`` forces one (``triton`` on CPU tensors needs
``TRITON_INTERPRET=1``). Inputs a Triton kernel does not take (float64, more than 256 stacked rows
in ``sym_gram``) always run on the reference. When Triton is importable the ops are
``torch.library.triton_op``s, so ``torch.compile`` traces through them into the kernels.
``sym_gram``'s backward is ``dD = (dG + dG^T) Q``: it reuses the Q of the forward and never reads
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


@_define("lalora::sym_gram", mutates_args=())
def sym_gram(D: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
    from .triton.gram import MAX_R
    if _triton_for(D, S) and D.shape[1] <= MAX_R:
        from .triton.gram import sym_gram as kernel
        return kernel(D, S)
    return reference.sym_gram(D, S)


if not HAS_TRITON:
    @cov_update_.register_fake
    def _(S, X, mask, weight):
        return None

    @sqcov_update_.register_fake
    def _(F, G, X, mask, weight):
        return None

    @sym_gram.register_fake
    def _(D, S):
        b, R, n = D.shape
        return D.new_empty((b, R, R), dtype=S.dtype), D.new_empty((b, R, n), dtype=S.dtype)


def _sym_gram_setup(ctx, inputs, output):
    D, _ = inputs
    _, Q = output
    ctx.save_for_backward(Q)
    ctx.d_dtype = D.dtype
    ctx.mark_non_differentiable(Q)
    ctx.set_materialize_grads(False)


def _sym_gram_backward(ctx, dG, dQ):
    (Q,) = ctx.saved_tensors
    if dG is None:
        return None, None
    dG = dG.to(Q.dtype)
    return torch.bmm(dG + dG.transpose(1, 2), Q).to(ctx.d_dtype), None


sym_gram.register_autograd(_sym_gram_backward, setup_context=_sym_gram_setup)
