"""Tile-packed symmetric storage (docs/SPEC.md, "Storage formats"), pure PyTorch.

A symmetric n x n factor S is cut into T x T tiles, ``nt = ceil(n / T)`` per side (the last row and
column of tiles zero-padded). Only tiles (I, J) with I <= J are stored, in row-major order of the
upper triangle, each as a contiguous row-major T x T block:

    index(I, J) = I * nt - I * (I - 1) / 2 + (J - I),      element (a, b) of the tile at
    packed[index(I, J) * T^2 + a * T + b] = S[I*T + a, J*T + b]   (0 outside n)

so a packed factor holds ``nt (nt + 1) / 2 * T^2`` numbers, about ``(1 + T/n) / 2`` of the dense
``n^2``. Diagonal tiles are stored whole and are exactly symmetric: every writer builds them from
their upper triangle (``mirror_upper``), never from a product that merely ought to be symmetric (no
BLAS promises that ``(X^T X)[i, j]`` and ``[j, i]`` are summed in the same order). The tiles of one
tile row are contiguous, so a backend can stream a tile row with unit stride.

This module is the oracle of every packed kernel: ``pack``/``unpack`` (an exact round trip),
``packed_cov_update_`` and ``packed_sym_gram`` (``Q = D S``, ``G = D S D^T``) read and write only the
packed numbers.
"""
from __future__ import annotations

from typing import Optional

import torch

# The tile of the packed layout: 32 keeps the padding and the diagonal tiles' duplicated half below
# 2% of the dense bytes at n >= 1024 ((1 + 32/n)/2 <= 0.516), and is a Triton/SIMD-friendly block.
TILE = 32


def num_tiles(n: int, tile: int = TILE) -> int:
    return -(-n // tile)


def packed_numel(n: int, tile: int = TILE) -> int:
    """Numbers stored for an n x n symmetric factor."""
    nt = num_tiles(n, tile)
    return nt * (nt + 1) // 2 * tile * tile


def tile_row_start(I: int, nt: int) -> int:
    """Index of tile (I, I), the first stored tile of tile row I."""
    return I * nt - I * (I - 1) // 2


def check_tile(tile: int) -> None:
    if not (isinstance(tile, int) and tile >= 1 and tile & (tile - 1) == 0):
        raise ValueError(f"tile={tile!r} must be a power of two (the packed layout's T)")


def _tiles(P: torch.Tensor, n: int, tile: int) -> torch.Tensor:
    """The (num_tiles, T, T) view of a packed factor, after checking its size."""
    if P.dim() != 1 or P.numel() != packed_numel(n, tile):
        raise ValueError(f"a packed factor of n={n}, tile={tile} is 1-D with {packed_numel(n, tile)} "
                         f"numbers; got shape {tuple(P.shape)}")
    return P.view(-1, tile, tile)


def mirror_upper(S: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle (diagonal included) is that of S, for (..., n, n):
    exactly symmetric whatever S's lower triangle holds."""
    return S.triu() + S.triu(1).transpose(-1, -2)


def pack(S: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    """Dense (n, n) -> packed 1-D, from S's upper triangle only: the packed factor is that of
    ``mirror_upper(S)`` (S itself when S is exactly symmetric), so ``unpack(pack(S)) == S`` exactly
    for every exactly symmetric S and ``pack(unpack(P)) == P`` for every packed P."""
    check_tile(tile)
    if S.dim() != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"pack takes a square (n, n) factor, got shape {tuple(S.shape)}")
    n = S.shape[0]
    nt = num_tiles(n, tile)
    pad = nt * tile - n
    full = torch.nn.functional.pad(S, (0, pad, 0, pad)).view(nt, tile, nt, tile).transpose(1, 2)
    I, J = torch.triu_indices(nt, nt, device=S.device)
    tiles = full[I, J]
    diag = I == J
    tiles[diag] = mirror_upper(tiles[diag])
    return tiles.reshape(-1).contiguous()


def mirror_diagonal_tiles_(P: torch.Tensor, n: int, tile: int = TILE) -> torch.Tensor:
    """Make every diagonal tile of a packed factor exactly symmetric from its upper triangle, in
    place (after an elementwise reduction whose summation order may differ between the two halves
    of a tile, e.g. a ring all-reduce over three or more ranks)."""
    tiles = _tiles(P, n, tile)
    nt = num_tiles(n, tile)
    diag = torch.tensor([tile_row_start(I, nt) for I in range(nt)], device=P.device)
    tiles[diag] = mirror_upper(tiles[diag])
    return P


def unpack(P: torch.Tensor, n: int, tile: int = TILE) -> torch.Tensor:
    """Packed 1-D -> dense (n, n); lower tiles are the transposes of the stored upper ones."""
    check_tile(tile)
    tiles = _tiles(P, n, tile)
    nt = num_tiles(n, tile)
    I, J = torch.triu_indices(nt, nt, device=P.device)
    full = P.new_zeros(nt, nt, tile, tile)
    full[J, I] = tiles.transpose(1, 2)
    full[I, J] = tiles               # diagonal tiles: the stored (symmetric) tile wins
    return full.transpose(1, 2).reshape(nt * tile, nt * tile)[:n, :n].contiguous()


def packed_trace(P: torch.Tensor, n: int, tile: int = TILE) -> torch.Tensor:
    """tr(S) from the diagonal tiles alone."""
    tiles = _tiles(P, n, tile)
    nt = num_tiles(n, tile)
    diag = torch.tensor([tile_row_start(I, nt) for I in range(nt)], device=P.device)
    return tiles[diag].diagonal(dim1=1, dim2=2).sum()


def packed_cov_update_(P: torch.Tensor, X: torch.Tensor, mask: Optional[torch.Tensor] = None,
                       weight: float = 1.0, tile: int = TILE) -> None:
    """S += weight * X^T diag(mask) X on a packed S (n = X.shape[-1]), in place.

    Tile row I is one product of X's columns I*T:(I+1)*T against columns I*T:, so about
    (1 + T/n)/2 of the dense multiply-adds are done; a diagonal tile adds the mirror of its
    product's upper triangle.
    """
    from .covariance import _valid_rows
    check_tile(tile)
    n = X.shape[-1]
    tiles = _tiles(P, n, tile)
    nt = num_tiles(n, tile)
    Xv = _valid_rows(X, mask, P.dtype)
    Xv = torch.nn.functional.pad(Xv, (0, nt * tile - n))
    for I in range(nt):
        lo = I * tile
        row = (Xv[:, lo:lo + tile].T @ Xv[:, lo:]).view(tile, nt - I, tile).transpose(0, 1)
        row = torch.cat([mirror_upper(row[0]).unsqueeze(0), row[1:]])
        start = tile_row_start(I, nt)
        tiles[start:start + nt - I].add_(row, alpha=weight)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype products with factors stored in ``dtype`` run and return in: float64 for float64
    factors, float32 otherwise (bf16 factors are a storage format; their products accumulate in fp32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def packed_sym_gram(D: torch.Tensor, P: torch.Tensor, n: int, tile: int = TILE
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
