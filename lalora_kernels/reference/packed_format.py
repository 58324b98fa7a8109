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

This module defines the format (``pack``/``unpack``: an exact round trip for every exactly
symmetric factor); the reference kernels that read and write it are ``packed_cov_update`` and
``grouped_gram``.
"""
from __future__ import annotations

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


MAX_TILE = 64      # the C++ kernels hold one 64 x 64 tile on the stack


def check_tile(tile: int) -> None:
    if not (isinstance(tile, int) and not isinstance(tile, bool) and 1 <= tile <= MAX_TILE and tile & (tile - 1) == 0):
        raise ValueError(f"tile={tile!r} must be a power of two from 1 to {MAX_TILE} (the packed layout's T)")


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
