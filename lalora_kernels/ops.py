"""The ``lalora::`` operators: schemas, fake kernels and autograd, in one list.

| op | semantics | shapes / dtypes |
|---|---|---|
| ``cov_update_`` | ``S += weight * X^T diag(mask) X`` (in place) | S (n, n) fp32/fp64; X (..., n) any float; mask (...) bool/0-1 or None |
| ``sqcov_update_`` | ``F += weight * (G*G)^T diag(mask) (X*X)`` (in place) | F (p, q) fp32/fp64; G (..., p); X (..., q) |
| ``sym_gram`` | ``G = D S D^T``, ``Q = D S`` (batched; differentiable in D) | D (b, R, n) any float; S (b, n, n) symmetric fp32/fp64 |

The default kernels are the pure-PyTorch reference (any device). Faster backends register
device kernels for the same schemas (``op.register_kernel("cuda")``), never new entry points.
``sym_gram``'s backward is ``dD = (dG + dG^T) Q``: it reuses the Q of the forward and never reads
S again, so one penalty step reads every factor exactly once.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference


@torch.library.custom_op("lalora::cov_update_", mutates_args=("S",))
def cov_update_(S: Tensor, X: Tensor, mask: Optional[Tensor], weight: float) -> None:
    reference.cov_update_(S, X, mask, weight)


@cov_update_.register_fake
def _(S, X, mask, weight):
    return None


@torch.library.custom_op("lalora::sqcov_update_", mutates_args=("F",))
def sqcov_update_(F: Tensor, G: Tensor, X: Tensor, mask: Optional[Tensor], weight: float) -> None:
    reference.sqcov_update_(F, G, X, mask, weight)


@sqcov_update_.register_fake
def _(F, G, X, mask, weight):
    return None


@torch.library.custom_op("lalora::sym_gram", mutates_args=())
def sym_gram(D: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
    return reference.sym_gram(D, S)


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
