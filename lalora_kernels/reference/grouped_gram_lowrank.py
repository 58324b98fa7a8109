"""``lalora::grouped_gram_lowrank``, pure PyTorch (its kernel on every device: two batched GEMMs per
class, D U and (D U) U^T, are what MKL and cuBLAS do best): ``grouped_gram`` on low-rank-plus-tail
factors (``lowrank_format``), O(n k R) per bundle instead of O(n^2 R):

    Q_k = D_k S_k,   G_k = Q_k D_k^T,   S_k = U_k diag(lam_k) U_k^T + rho_k (I - U_k U_k^T)

classes: the class table of ``gram_meta`` with ``s_off`` the offset of each class's U (m factors of
n x k numbers) in the flat ``U``; ranks: ``[k, e_off]`` per class, ``e_off`` the offset of its m
eigen vectors ``[rho, lam_1 .. lam_k]`` in the flat ``E``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..gram_meta import gram_numel, read_classes
from .lowrank_format import sym_gram


def class_views(D, U, E, classes: Sequence[int], ranks: Sequence[int]):
    """Per class: (c, D (m, R, n), U (m, n, k), E (m, k + 1))."""
    for j, c in enumerate(read_classes(classes)):
        k, e_off = ranks[2 * j], ranks[2 * j + 1]
        yield (c, D[c.d_off:c.d_off + c.m * c.R * c.n].view(c.m, c.R, c.n),
               U[c.s_off:c.s_off + c.m * c.n * k].view(c.m, c.n, k), E[e_off:e_off + c.m * (k + 1)].view(c.m, k + 1))


def grouped_gram_lowrank(D: torch.Tensor, U: torch.Tensor, E: torch.Tensor, classes: Sequence[int],
                         ranks: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (G, Q) for every class (G, Q in E's dtype); entries no class covers are 0."""
    G = D.new_zeros((gram_numel(classes),), dtype=E.dtype)
    Q = D.new_zeros(D.shape, dtype=E.dtype)
    for c, Dc, Uc, Ec in class_views(D, U, E, classes, ranks):
        if c.m == 0:
            continue
        g, q = sym_gram(Dc, Uc, Ec)
        G[c.g_off:c.g_off + c.m * c.R * c.R].copy_(g.reshape(-1))
        Q[c.d_off:c.d_off + c.m * c.R * c.n].copy_(q.reshape(-1))
    return G, Q
