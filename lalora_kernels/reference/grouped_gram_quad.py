"""``lalora::grouped_gram_quad``, pure PyTorch: ``grouped_gram``'s products followed by the kfac/tri
penalty's epilogue (SPEC section 4, project note "One primitive touches the big factors"):

    v = 1/2 <C, G>,   dD_k = (W_k + W_k^T) Q_k,   W = dv/dG = C / 2

C: weights laid out like G (the blocks ``lam s^2 / c * Cbb`` resp. ``Caa``).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .grouped_gram import grouped_gram, sym_grad


def grouped_gram_quad(D: torch.Tensor, arena: torch.Tensor, classes: Sequence[int], tile: int, C: torch.Tensor,
                      grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns v (0-dim) and dD flat like D, or empty when not ``grad``; both in G's dtype."""
    G, Q = grouped_gram(D, arena, classes, tile)
    return epilogue(G, Q, classes, C, grad)


def epilogue(G: torch.Tensor, Q: torch.Tensor, classes: Sequence[int], C: torch.Tensor, grad: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The epilogue alone, on given flat (G, Q)."""
    C = C.to(G.dtype)
    return 0.5 * torch.dot(C, G), sym_grad(0.5 * C, Q, classes) if grad else Q.new_empty(0)
