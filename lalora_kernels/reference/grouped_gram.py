"""``lalora::grouped_gram``, pure PyTorch: the one product of the penalty that touches a big factor
(SPEC section 4), for every bundle of a class table (``gram_meta``):

    Q_k = D_k S_k,   G_k = Q_k D_k^T

D stacks the (transposed) LoRA deltas that share the symmetric factor S (``dA`` rows against
``Sx``, ``dB^T`` rows against ``Sg``). Q is returned too: the gradient of any function of G is
``(dG + dG^T) Q``, so no second read of S is ever needed. Factors are dense (tile 0) or tile-packed
(``packed_format``); products run in ``compute_dtype`` of the arena.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..gram_meta import gram_numel, read_classes
from .packed_format import check_tile, num_tiles, packed_numel, tile_row_start


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype products with factors stored in ``dtype`` run and return in: float64 for float64
    factors, float32 otherwise (bf16 factors are a storage format; their products accumulate in fp32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sym_gram(D: torch.Tensor, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """G = D S D^T and Q = D S, batched. D: (b, R, n) any float dtype, S: (b, n, n) symmetric.
    Returns G: (b, R, R) and Q: (b, R, n), both in ``compute_dtype(S.dtype)``."""
    ct = compute_dtype(S.dtype)
    D, S = D.to(ct), S.to(ct)
    Q = torch.bmm(D, S)
    return torch.bmm(Q, D.transpose(1, 2)), Q


def packed_sym_gram(D: torch.Tensor, P: torch.Tensor, n: int, tile: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """G = D S D^T and Q = D S for a batch of packed factors, reading each stored tile once.

    D: (b, R, n) any float dtype; P: (b, packed_numel(n)) or a flat buffer of b packed factors.
    Returns G (b, R, R) and Q (b, R, n) in fp64 for fp64 factors, else fp32 (bf16 factors are
    upcast one tile row at a time). Tile (I, J), I < J, adds D_I S_IJ to Q's column block J and
    D_J S_IJ^T to block I; a diagonal tile adds D_I S_II once.
    """
    check_tile(tile)
    b, R = D.shape[0], D.shape[1]
    nt = num_tiles(n, tile)
    tiles = P.reshape(b, -1, tile, tile)
    if tiles.shape[1] != nt * (nt + 1) // 2:
        raise ValueError(f"expected {b} packed factors of n={n}, tile={tile}; got {P.numel()} numbers")
    ct = compute_dtype(P.dtype)
    D = D.to(ct)
    Dp = torch.nn.functional.pad(D, (0, nt * tile - n)).view(b, R, nt, tile)
    Q = torch.zeros_like(Dp)
    for I in range(nt):
        start = tile_row_start(I, nt)
        row = tiles[:, start:start + nt - I].to(ct)                     # (b, nt-I, T, T)
        Q[:, :, I:] += torch.einsum("brt,bjts->brjs", Dp[:, :, I], row)
        if I + 1 < nt:
            Q[:, :, I] += torch.einsum("brjs,bjts->brt", Dp[:, :, I + 1:], row[:, 1:])
    Q = Q.reshape(b, R, nt * tile)[:, :, :n]
    return torch.bmm(Q, D.transpose(1, 2)), Q.contiguous()


def class_views(flat: torch.Tensor, classes: Sequence[int], kind: str, tile: int = 0):
    """Per class, the (m, rows, cols) view of a flat buffer laid out by the class table.
    kind: 'D' (m, R, n), 'S' (m, n, n), or (m, 1, packed_numel(n)) when ``tile`` > 0, or 'G' (m, R, R)."""
    for c in read_classes(classes):
        s_shape = (1, packed_numel(c.n, tile)) if tile else (c.n, c.n)
        rows, cols, off = {"D": (c.R, c.n, c.d_off), "S": (*s_shape, c.s_off), "G": (c.R, c.R, c.g_off)}[kind]
        yield flat[off:off + c.m * rows * cols].view(c.m, rows, cols)


def gram_outputs_like(D: torch.Tensor, arena: torch.Tensor, classes: Sequence[int], grad: Optional[bool] = None):
    """Empty outputs shaped like ``grouped_gram``'s (G, Q), or with ``grad`` given like
    ``grouped_gram_quad``'s (value, dD): the ops' fake (meta) implementations."""
    ct = compute_dtype(arena.dtype)
    if grad is None:
        return D.new_empty((gram_numel(classes),), dtype=ct), D.new_empty(D.shape, dtype=ct)
    return D.new_empty((), dtype=ct), D.new_empty(D.shape if grad else (0,), dtype=ct)


def sym_grad(W: torch.Tensor, Q: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """dD_k = (W_k + W_k^T) Q_k for every bundle: the gradient in D of any f(G) with W = df/dG,
    from the forward's Q = D S (S is not read again). Flat W like G, flat Q like D."""
    out = Q.new_zeros(Q.shape)            # rows outside every class (none in a built table) stay 0
    for w, q, o in zip(class_views(W, classes, "G"), class_views(Q, classes, "D"), class_views(out, classes, "D")):
        torch.bmm(w + w.transpose(1, 2), q, out=o)
    return out


def grouped_gram(D: torch.Tensor, arena: torch.Tensor, classes: Sequence[int], tile: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (G, Q) for every class of the table (factors dense, or tile-packed with tile > 0)."""
    ct = compute_dtype(arena.dtype)
    G = D.new_zeros((gram_numel(classes),), dtype=ct)
    Q = D.new_zeros(D.shape, dtype=ct)
    views = zip(class_views(D, classes, "D"), class_views(arena, classes, "S", tile), class_views(G, classes, "G"),
                class_views(Q, classes, "D"))
    for Dc, Sc, Gc, Qc in views:
        if Dc.shape[0] == 0:        # an empty class: its (no) outputs stay 0
            continue
        g, q = packed_sym_gram(Dc, Sc, Dc.shape[2], tile) if tile else sym_gram(Dc, Sc)
        Gc.copy_(g)
        Qc.copy_(q)
    return G, Q
