"""``lalora::packed_cov_update_``, pure PyTorch: ``cov_update_`` on a tile-packed factor
(``packed_format``), reading and writing only the stored tiles."""
from __future__ import annotations

from typing import Optional

import torch

from .cov_update import valid_rows
from .packed_format import TILE, _tiles, check_tile, mirror_upper, num_tiles, tile_row_start


def packed_cov_update_(P: torch.Tensor, X: torch.Tensor, mask: Optional[torch.Tensor] = None,
                       weight: float = 1.0, tile: int = TILE) -> None:
    """S += weight * X^T diag(mask) X on a packed S (n = X.shape[-1]), in place.

    Tile row I is one product of X's columns I*T:(I+1)*T against columns I*T:, so about
    (1 + T/n)/2 of the dense multiply-adds are done; a diagonal tile adds the mirror of its
    product's upper triangle.
    """
    check_tile(tile)
    n = X.shape[-1]
    tiles = _tiles(P, n, tile)
    nt = num_tiles(n, tile)
    Xv = valid_rows(X, mask, P.dtype)
    Xv = torch.nn.functional.pad(Xv, (0, nt * tile - n))
    for I in range(nt):
        lo = I * tile
        row = (Xv[:, lo:lo + tile].T @ Xv[:, lo:]).view(tile, nt - I, tile).transpose(0, 1)
        row = torch.cat([mirror_upper(row[0]).unsqueeze(0), row[1:]])
        start = tile_row_start(I, nt)
        tiles[start:start + nt - I].add_(row, alpha=weight)
