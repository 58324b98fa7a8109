"""``lalora::packed_cov_update_`` on Triton: ``S += w X^T diag(m) X`` on a tile-packed S
(``reference.packed_format``: upper T x T tiles only).

One program per stored tile (I <= J) and token split, writing its tile contiguously (a diagonal tile
mirrored from its upper half). No mirror tile is written, so the update writes half the bytes of
the dense kernel. Token splits add up in a fixed order.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import INTERPRET, check_operands, dot_precision, split_rows
from .cov_update import syrk_tile


def check_tile(tile: int) -> None:
    if tile < 16 or tile & (tile - 1):
        raise ValueError(f"the Triton packed kernels need a power-of-two tile >= 16 (tl.dot blocks), got "
                         f"tile={tile}; use the default tile (32) or LALORA_BACKEND=torch")


_TABLES: dict = {}


def _tile_table(nt: int, device) -> torch.Tensor:
    """(I, J) of every stored tile, in storage order, as int32 pairs; built once per (nt, device)
    rather than on every update of the proxy pass."""
    key = (nt, str(device))
    if key not in _TABLES:
        _TABLES[key] = torch.triu_indices(nt, nt, device=device).T.contiguous().to(torch.int32)
    return _TABLES[key]


@triton.jit
def _packed_syrk_kernel(X, M, P, TI, N, n, rows_per_split, stride_xn, stride_xk, stride_ps, w,
                        HAS_MASK: tl.constexpr, T: tl.constexpr, BLOCK_K: tl.constexpr,
                        PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    t = tl.program_id(0)
    split = tl.program_id(1)
    ti = tl.load(TI + 2 * t)
    tj = tl.load(TI + 2 * t + 1)
    ri = ti * T + tl.arange(0, T)
    rj = tj * T + tl.arange(0, T)
    acc = syrk_tile(X, M, ri, rj, N, n, split, rows_per_split, stride_xn, stride_xk, w, ti == tj,
                    HAS_MASK, T, BLOCK_K, PRECISION, UPCAST)
    loc = tl.arange(0, T)
    p = P + split.to(tl.int64) * stride_ps + t.to(tl.int64) * T * T + loc[:, None] * T + loc[None, :]
    tl.store(p, tl.load(p) + acc)


def packed_cov_update_(P: torch.Tensor, X: torch.Tensor, mask: Optional[torch.Tensor], weight: float,
                       tile: int, splits: Optional[int] = None) -> None:
    """Launcher; ``splits`` forces the token-axis split (tests), otherwise it is chosen from shape."""
    check_operands(P, X)
    check_tile(tile)
    n = X.shape[-1]
    X = X.reshape(-1, n)
    N = X.shape[0]
    nt = triton.cdiv(n, tile)
    tiles = nt * (nt + 1) // 2
    if P.dim() != 1 or P.numel() != tiles * tile * tile or not P.is_contiguous():
        raise ValueError(f"P must be a contiguous packed factor of {tiles * tile * tile} numbers (n={n}, "
                         f"tile={tile}); got shape {tuple(P.shape)}")
    if N == 0:
        return
    m = None if mask is None else mask.reshape(-1).to(device=X.device, dtype=torch.int8)
    ij = _tile_table(nt, X.device)
    k, rows = split_rows(tiles, N, splits)
    out = P if k == 1 else torch.zeros((k, P.numel()), dtype=torch.float32, device=P.device)
    _packed_syrk_kernel[(tiles, k)](
        X, m if m is not None else X, out, ij, N, n, rows, X.stride(0), X.stride(1),
        0 if k == 1 else out.stride(0), float(weight), HAS_MASK=m is not None, T=tile,
        BLOCK_K=64, PRECISION=dot_precision(X.dtype), UPCAST=INTERPRET, num_warps=4, num_stages=3)
    if k > 1:
        P.add_(out.sum(0))
