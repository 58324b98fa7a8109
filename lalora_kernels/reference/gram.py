"""The one product of the penalty that touches a big factor (SPEC section 4), pure PyTorch.

Every variant's penalty is a small function of ``G = D S D^T`` per adapter bundle, where D stacks
the (transposed) LoRA deltas that share the symmetric factor S (``dA`` rows against ``Sx``,
``dB^T`` rows against ``Sg``). ``Q = D S`` is returned too: the gradient of any function of G is
``(dG + dG^T) Q``, so no second read of S is ever needed.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .packed import compute_dtype, packed_numel, packed_sym_gram


def sym_gram(D: torch.Tensor, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """G = D S D^T and Q = D S, batched. D: (b, R, n) any float dtype, S: (b, n, n) symmetric.
    Returns G: (b, R, R) and Q: (b, R, n), both in ``compute_dtype(S.dtype)``."""
    ct = compute_dtype(S.dtype)
    D, S = D.to(ct), S.to(ct)
    Q = torch.bmm(D, S)
    return torch.bmm(Q, D.transpose(1, 2)), Q


def class_views(flat: torch.Tensor, classes: Sequence[int], kind: str, tile: int = 0):
    """Per class, the (m, rows, cols) view of a flat buffer laid out by ``GramLayout``.
    kind: 'D' (m, R, n), 'S' (m, n, n), or (m, 1, packed_numel(n)) when ``tile`` > 0, or 'G' (m, R, R)."""
    for c in range(0, len(classes), 6):
        n, R, m, d_off, s_off, g_off = classes[c:c + 6]
        s_shape = (1, packed_numel(n, tile)) if tile else (n, n)
        rows, cols, off = {"D": (R, n, d_off), "S": (*s_shape, s_off), "G": (R, R, g_off)}[kind]
        yield flat[off:off + m * rows * cols].view(m, rows, cols)


def gram_numel(classes: Sequence[int]) -> int:
    """Numbers in the flat G of a ``GramLayout``'s classes (sum of m R^2)."""
    return sum(classes[c + 1] ** 2 * classes[c + 2] for c in range(0, len(classes), 6))


def gram_outputs_like(D: torch.Tensor, arena: torch.Tensor, classes: Sequence[int], grad: Optional[bool] = None):
    """Empty outputs shaped like ``grouped_gram``'s (G, Q), or with ``grad`` given like
    ``grouped_gram_quad``'s (value, dD): the ops' fake (meta) implementations."""
    ct = compute_dtype(arena.dtype)
    if grad is None:
        return D.new_empty((gram_numel(classes),), dtype=ct), D.new_empty(D.shape, dtype=ct)
    return D.new_empty((), dtype=ct), D.new_empty(D.shape if grad else (0,), dtype=ct)


def sym_grad(W: torch.Tensor, Q: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """dD_k = (W_k + W_k^T) Q_k for every item: the gradient in D of any f(G) with W = df/dG,
    from the forward's Q = D S (S is not read again). Flat W like G, flat Q like D."""
    return torch.cat([torch.bmm(w + w.transpose(1, 2), q).reshape(-1)
                      for w, q in zip(class_views(W, classes, "G"), class_views(Q, classes, "D"))])


def grouped_gram(D: torch.Tensor, arena: torch.Tensor, classes: Sequence[int], tile: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat form of ``sym_gram`` over every class of a ``GramLayout`` (factors dense, or tile-packed
    with tile ``tile`` > 0): returns flat (G, Q)."""
    Gs, Qs = [], []
    for Dc, Sc in zip(class_views(D, classes, "D"), class_views(arena, classes, "S", tile)):
        G, Q = packed_sym_gram(Dc, Sc, Dc.shape[2], tile) if tile else sym_gram(Dc, Sc)
        Gs.append(G.reshape(-1))
        Qs.append(Q.reshape(-1))
    return torch.cat(Gs), torch.cat(Qs)


def gram_quad(G: torch.Tensor, Q: torch.Tensor, classes: Sequence[int], C: torch.Tensor, grad: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The kfac/tri penalty epilogue on flat (G, Q) of ``grouped_gram`` (SPEC section 4):

        v = 1/2 <C, G>,   dD_k = (W_k + W_k^T) Q_k,  W = dv/dG = C / 2

    C: weights laid out like G (the blocks ``lam s^2 / c * Cbb`` resp. ``Caa``). Returns v (0-dim)
    and dD flat like D, or empty when not ``grad``; both in G's dtype."""
    if C.numel() != G.numel():
        raise ValueError(f"C has {C.numel()} numbers; it must hold {G.numel()} (one per entry of G)")
    C = C.to(G.dtype)
    return 0.5 * torch.dot(C, G), sym_grad(0.5 * C, Q, classes) if grad else Q.new_empty(0)
