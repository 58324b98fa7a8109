"""``lalora::cov_update_``, pure PyTorch: masked covariance accumulation (SPEC sections 2 and 7).

The op's kernel on the CPU and the oracle of every other backend. Inputs may be
bf16/fp16/fp32/fp64; the update is carried out in the accumulator's dtype (fp32, or fp64 for
float64 models).
"""
from __future__ import annotations

from typing import Optional

import torch

from .packed_format import mirror_upper

# Column-panel width of the one-triangle update. Panels are wide enough for BLAS to run at full
# speed, and with n/256 panels only about (1 + 256/n)/2 of the full GEMM's multiply-adds are done.
SYRK_PANEL = 256


def valid_rows(X: torch.Tensor, mask: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """X as (N, n) in ``dtype`` with masked rows zeroed (no data-dependent shapes: traceable)."""
    X = X.reshape(-1, X.shape[-1]).to(dtype)
    if mask is not None:
        X = torch.where(mask.reshape(-1, 1) != 0, X, torch.zeros((), dtype=dtype, device=X.device))
    return X


def cov_update_(S: torch.Tensor, X: torch.Tensor, mask: Optional[torch.Tensor] = None,
                weight: float = 1.0) -> None:
    """S += weight * X^T diag(mask) X, in place.

    S: (n, n) fp32/fp64, X: (..., n) any float dtype (leading dims flattened to N rows),
    mask: (...) bool or 0/1 with X's leading shape, rows with mask == 0 are skipped.
    Only the upper panels of the product are computed; the lower ones are their transposes and a
    diagonal block adds the mirror of its upper triangle, so a symmetric S stays exactly (bitwise)
    symmetric whatever order the GEMM summed in.
    """
    X = valid_rows(X, mask, S.dtype)
    n = X.shape[1]
    for lo in range(0, n, SYRK_PANEL):
        hi = min(lo + SYRK_PANEL, n)
        panel = X[:, lo:hi].T @ X[:, lo:]            # rows lo:hi, columns lo:n
        diag = panel[:, : hi - lo]
        S[lo:hi, lo:hi].add_(mirror_upper(diag), alpha=weight)
        S[lo:hi, hi:].add_(panel[:, hi - lo:], alpha=weight)
        S[hi:, lo:hi].add_(panel[:, hi - lo:].T, alpha=weight)
