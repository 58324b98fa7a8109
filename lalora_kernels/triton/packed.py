"""Triton kernels on tile-packed symmetric factors (``reference.packed``: upper T x T tiles only).

* ``packed_cov_update_``: ``S += w X^T diag(m) X``; one program per stored tile (I <= J) and token
  split, writing its tile contiguously (diagonal tiles symmetrised exactly). No mirror is written, so
  the update writes half the bytes of the dense kernel. Token splits add up in a fixed order.
* ``packed_gram``: ``Q_k = D_k S_k``, ``G_k = D_k S_k D_k^T`` for every item of a ``GramLayout``
  built with ``tile=T`` (its ``work`` table then has one T-wide column block per program). Program
  (item, row tile, column block J) walks the virtual column J of S: tile (I, J) for I <= J and the
  transpose of tile (J, I) below the diagonal (a transposed load, no copy). The Gram shares are
  added by the dense kernel's deterministic reduction.

Traffic: storage and the update's writes are halved; the product loads an off-diagonal tile twice
(once for each of its two column blocks), so per call it issues about as many loads as the dense
kernel. The programs walk their columns in anti-diagonal order (step k of column J reads tile row
k - J mod nt), so the two programs that need a tile load it in the same step and, when both run at
once, the second load can be served by L2: that is meant to bring the bytes read from memory
towards the packed size, and is unmeasured until a GPU run. A strict single-read version needs
partial sums across programs.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

from .accumulate import syrk_tile
from .common import INTERPRET, check_operands, dot_precision, launch, split_rows
from .gram import gram_share, launch_buckets, work_item


def _check_tile(tile: int) -> None:
    if tile < 16 or tile & (tile - 1):
        raise ValueError(f"the Triton packed kernels need a power-of-two tile >= 16 (tl.dot blocks), got "
                         f"tile={tile}; use the default tile (32) or LALORA_BACKEND=torch")


_TABLES: dict = {}


def _tile_table(nt: int, device) -> torch.Tensor:
    """(I, J) of every stored tile, in storage order, as int32 pairs; built once per (nt, device)
    rather than on every update of the proxy pass."""
    key = (nt, str(device))
    if key in _TABLES:
        return _TABLES[key]
    table = torch.triu_indices(nt, nt, device=device).T.contiguous().to(torch.int32)
    if not is_fake(table):           # while torch.compile traces, tensors are fake: never cache those
        _TABLES[key] = table
    return table


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
    _check_tile(tile)
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
    launch(_packed_syrk_kernel)[(tiles, k)](
        X, m if m is not None else X, out, ij, N, n, rows, X.stride(0), X.stride(1),
        0 if k == 1 else out.stride(0), float(weight), HAS_MASK=m is not None, T=tile,
        BLOCK_K=64, PRECISION=dot_precision(X.dtype), UPCAST=INTERPRET, num_warps=4, num_stages=3)
    if k > 1:
        P.add_(out.sum(0))


@triton.jit
def packed_panel(D, S, s_off, n, d_off, R, rr, tj, BLOCK_R: tl.constexpr, T: tl.constexpr,
                 PRECISION: tl.constexpr):
    """q = D[rows rr, :] S[:, column block tj] for a tile-packed factor (virtual column tj)."""
    nt = tl.cdiv(n, T)
    loc = tl.arange(0, T)
    q = tl.zeros((BLOCK_R, T), dtype=tl.float32)
    for k in range(0, nt):
        # anti-diagonal order: at step k, column tj reads tile row ti = k - tj (mod nt), and column ti
        # reads tile row tj, so the two programs that need a stored tile load it in the same step
        ti = (k - tj + nt) % nt
        rk = ti * T + loc
        d = tl.load(D + d_off + rr[:, None] * n + rk[None, :],
                    mask=(rr[:, None] < R) & (rk[None, :] < n), other=0.0)
        lo = tl.minimum(ti, tj)
        hi = tl.maximum(ti, tj)
        base = S + s_off + (lo * nt - lo * (lo - 1) // 2 + hi - lo).to(tl.int64) * T * T
        # element [k, j] of S(ti, tj): the stored tile above the diagonal, its transpose below
        offs = tl.where(ti <= tj, loc[:, None] * T + loc[None, :], loc[None, :] * T + loc[:, None])
        q += tl.dot(d, tl.load(base + offs).to(tl.float32), input_precision=PRECISION)
    return q


@triton.jit
def _packed_panels_kernel(D, S, Q, Gp, items, work, w_start, cols,
                          BLOCK_R: tl.constexpr, T: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    rt, tj, s_off, n, d_off, R = work_item(items, work, w_start + pid)
    rr = rt * BLOCK_R + tl.arange(0, BLOCK_R)
    rj = tj * T + tl.arange(0, T)
    q = packed_panel(D, S, s_off, n, d_off, R, rr, tj, BLOCK_R, T, PRECISION)
    gram_share(q, D, Q, Gp, pid, d_off, n, R, rr, rj, cols, BLOCK_R, PRECISION)


def packed_gram(D: torch.Tensor, arena: torch.Tensor, items: torch.Tensor, work: torch.Tensor,
                pairs: torch.Tensor, plan: list[int], g_size: int, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher: D (d_size,) fp32, arena of tile-packed factors (fp32), tables from
    ``GramLayout(..., tile=tile).tables()`` (one T-wide column block per work entry)."""
    _check_tile(tile)
    return launch_buckets(_packed_panels_kernel, D, arena, items, work, pairs, plan, g_size, T=tile)
