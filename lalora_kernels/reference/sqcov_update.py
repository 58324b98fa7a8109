"""``lalora::sqcov_update_``, pure PyTorch: the ``diag`` curvature's squared-operand GEMM
(SPEC section 4), on every device without a faster kernel and as the oracle."""
from __future__ import annotations

from typing import Optional

import torch

from .cov_update import valid_rows


def sqcov_update_(F: torch.Tensor, G: torch.Tensor, X: torch.Tensor,
                  mask: Optional[torch.Tensor] = None, weight: float = 1.0) -> None:
    """F += weight * (G*G)^T diag(mask) (X*X), in place (the ``diag`` curvature's GEMM).

    F: (p, q) fp32/fp64, G: (..., p), X: (..., q) with the same leading shape, mask as above.
    """
    G = valid_rows(G, mask, F.dtype)
    X = valid_rows(X, mask, F.dtype)
    F.addmm_(G.square().T, X.square(), alpha=weight)
