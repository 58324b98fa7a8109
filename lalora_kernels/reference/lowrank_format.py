"""Low-rank-plus-tail symmetric storage (docs/SPEC.md section 8), pure PyTorch.

A positive semi-definite n x n factor S is kept as

    S_c = U diag(lam) U^T + rho (I - U U^T)

with U (n x k, orthonormal columns: the top-k eigenvectors), lam (k,) their eigenvalues, and the
tail rho the mean of the other n - k eigenvalues, so that ``tr(S_c) = tr(S)`` exactly. Two tensors
per factor: U (stored in the factors' dtype, fp32 or bf16) and ``E = [rho, lam_1 .. lam_k]`` (kept
in fp32, or fp64 for fp64 factors). Every identity of the penalty holds for S_c as for any symmetric
factor; its products with a bundle's rows D are

    D S_c = (D U) diag(lam - rho) U^T + rho D,      D S_c D^T = (D U) diag(lam - rho) (D U)^T + rho D D^T

O(n k R) instead of O(n^2 R). With a U rounded to bf16 (no longer exactly orthonormal) these are
still the products of the matrix the formula defines from the stored U: the penalty is exact for
the factor as stored.
"""
from __future__ import annotations

from typing import Optional

import torch


def choose_k(lam_desc: torch.Tensor, trace: float, k: Optional[int], energy: Optional[float], n: int) -> int:
    """How many eigenpairs to keep: ``k`` (at most n), or the fewest whose eigenvalues hold
    ``energy`` of the trace (at least 1)."""
    if (k is None) == (energy is None):
        raise ValueError("give exactly one of rank=k or energy=fraction of the trace")
    if k is not None:
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"rank={k!r} must be a positive int")
        return min(k, n)
    if not 0 < energy <= 1:
        raise ValueError(f"energy={energy!r} must be in (0, 1]")
    if trace <= 0:
        return 1
    kept = torch.cumsum(lam_desc.clamp_min(0).double(), 0)
    return min(n, int((kept < energy * trace).sum()) + 1)


def tail(trace: float, lam: torch.Tensor, n: int) -> float:
    """rho: the mean of the eigenvalues left out, from the exact trace (0 when nothing is left)."""
    k = lam.numel()
    return max(0.0, (trace - float(lam.double().sum())) / (n - k)) if n > k else 0.0


def compress(S: torch.Tensor, k: Optional[int] = None, energy: Optional[float] = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, E) of a dense symmetric PSD S from its eigendecomposition (in float64), in S's dtype
    (E in fp32 for fp32/bf16 factors)."""
    n = S.shape[0]
    lam, V = torch.linalg.eigh(S.double())
    lam, V = lam.flip(0), V.flip(1)                              # descending
    trace = float(S.double().diagonal().sum())
    kk = choose_k(lam, trace, k, energy, n)
    lam_k = lam[:kk].clamp_min(0)
    E = torch.cat([lam_k.new_tensor([tail(trace, lam_k, n)]), lam_k])
    return V[:, :kk].to(S.dtype).contiguous(), E.to(eigen_dtype(S.dtype))


def eigen_dtype(dtype: torch.dtype) -> torch.dtype:
    """E keeps fp64 for fp64 factors, fp32 otherwise (bf16 U included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def expand(U: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
    """The dense S_c = U diag(lam) U^T + rho (I - U U^T) of a stored (U, E), in E's dtype."""
    Uc = U.to(E.dtype)
    rho, lam = E[0], E[1:]
    n = U.shape[0]
    S = (Uc * (lam - rho)) @ Uc.T + rho * torch.eye(n, dtype=E.dtype, device=E.device)
    return 0.5 * (S + S.T)


def trace(U: torch.Tensor, E: torch.Tensor) -> float:
    """tr(S_c) from (U, E): sum lam_i |u_i|^2 + rho (n - |U|_F^2) (= sum lam + rho (n - k) when U is
    orthonormal)."""
    Uc = U.to(E.dtype)
    norms = Uc.square().sum(0)
    return float((E[1:] * norms).sum() + E[0] * (U.shape[0] - norms.sum()))


def sym_gram(D: torch.Tensor, U: torch.Tensor, E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """G = D S_c D^T and Q = D S_c for a batch of bundles. D: (b, R, n), U: (b, n, k), E: (b, k + 1).
    Returns G (b, R, R) and Q (b, R, n) in E's dtype."""
    ct = E.dtype
    D, U = D.to(ct), U.to(ct)
    rho = E[:, :1, None]                                     # (b, 1, 1)
    P = torch.bmm(D, U)                                      # (b, R, k)
    Pw = P * (E[:, None, 1:] - rho)
    G = torch.bmm(Pw, P.transpose(1, 2)) + rho * torch.bmm(D, D.transpose(1, 2))
    Q = torch.bmm(Pw, U.transpose(1, 2)) + rho * D
    return G, Q


def nystrom(Y: torch.Tensor, omega: torch.Tensor, trace: float, k: Optional[int], energy: Optional[float]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, E) of a PSD S known only through the sketch ``Y = S Omega`` (n x l) and its exact trace:
    the stabilised Nystrom approximation (Tropp, Yurtsever, Udell and Cevher, 2017), in float64,
    then the top k of its l eigenpairs (or as many as hold ``energy`` of the trace, at most l) and
    the tail from the trace."""
    n, dtype = Y.shape[0], Y.dtype
    Y, omega = Y.double(), omega.double()
    # the shift covers the sketch's own rounding (it was summed in ``dtype``)
    nu = (n ** 0.5) * torch.finfo(dtype).eps * float(torch.linalg.matrix_norm(Y, ord=2))
    Yn = Y + nu * omega
    C = omega.T @ Yn
    w, Vc = torch.linalg.eigh(0.5 * (C + C.T))
    keep = w > w.max().clamp_min(0) * torch.finfo(dtype).eps * C.shape[0]      # C^{+1/2} on its range
    B = Yn @ (Vc[:, keep] * w[keep].rsqrt())                          # B B^T = Yn C^+ Yn^T
    V, sig, _ = torch.linalg.svd(B, full_matrices=False)
    lam = (sig.square() - nu).clamp_min(0)
    kk = min(choose_k(lam, trace, k, energy, n), lam.numel())
    lam_k = lam[:kk]
    E = torch.cat([lam_k.new_tensor([tail(trace, lam_k, n)]), lam_k])
    return V[:, :kk].to(dtype).contiguous(), E.to(eigen_dtype(dtype))
