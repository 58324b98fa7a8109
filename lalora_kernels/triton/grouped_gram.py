"""``lalora::grouped_gram`` on Triton: the penalty's factor product for every bundle of a model at once
(SPEC section 4), factors dense or tile-packed:

    for every item k:   Q_k = D_k S_k,   G_k = Q_k D_k^T

All factors live in one flat arena (fp32 or bf16, widened in registers), all stacked rows ``D_k``
(R_k x n_k) in one flat fp32 buffer, addressed through the item table of ``gram_meta.triton_tables``
(offsets into flat buffers, no pointer-to-pointer loads). One launch per bucket (row-tile size 16,
32 or 64) covers all its items: program (item, row tile, column block J) reads the column block
S_k[:, J] once, forms Q_k[rows, J] and its share of the Gram rows; a second small launch adds the
shares in a fixed order (deterministic G).

Dense factors: a column block is ``DENSE_PANEL`` columns, read straight. Packed factors: a column
block is one tile column J, walked as tile (I, J) for I <= J and the transpose of the stored tile
(J, I) below the diagonal (a transposed load, no copy). An off-diagonal tile is loaded by the two
programs of its two column blocks; they walk in anti-diagonal order (step k of column J reads tile
row k - J mod nt), so both load it in the same step and the second load can come from L2. Storage
is halved; whether the bytes read from memory are too is for a GPU run to measure
(``benchmarks/bench_kernels.py``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..gram_meta import DENSE_PANEL, gram_numel, triton_tables
from .common import FP32_DOT, ITEM_D_OFF, ITEM_FIELDS, ITEM_G_OFF, ITEM_N, ITEM_R, ITEM_S_OFF
from .packed_cov_update import check_tile


@triton.jit
def work_item(items, work, w):
    """Row tile, column block and the item's n, R, d_off, s_off, g_off for work entry w."""
    item = tl.load(work + 3 * w)
    rt = tl.load(work + 3 * w + 1)
    cj = tl.load(work + 3 * w + 2)
    row = items + ITEM_FIELDS * item
    return (rt, cj, tl.load(row + ITEM_N), tl.load(row + ITEM_R), tl.load(row + ITEM_D_OFF),
            tl.load(row + ITEM_S_OFF), tl.load(row + ITEM_G_OFF))


@triton.jit
def dense_panel(D, S, s_off, n, d_off, R, rr, rj, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """q = D[rows rr, :] S[:, columns rj] for a dense factor (column panel read once)."""
    q = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, n, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        d = tl.load(D + d_off + rr[:, None] * n + rk[None, :],
                    mask=(rr[:, None] < R) & (rk[None, :] < n), other=0.0)
        s = tl.load(S + s_off + rk[:, None] * n + rj[None, :],
                    mask=(rk[:, None] < n) & (rj[None, :] < n), other=0.0).to(tl.float32)
        q += tl.dot(d, s, input_precision=PRECISION)
    return q


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
def panel(D, S, s_off, n, d_off, R, rr, cj, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
          TILE: tl.constexpr, PRECISION: tl.constexpr):
    """q = D[rows rr, :] S[:, column block cj] and the block's columns, dense (TILE 0) or packed."""
    rj = cj * BLOCK_N + tl.arange(0, BLOCK_N)
    if TILE > 0:            # tile-packed factor: BLOCK_N == TILE, column block cj is tile column cj
        q = packed_panel(D, S, s_off, n, d_off, R, rr, cj, BLOCK_R, TILE, PRECISION)
    else:
        q = dense_panel(D, S, s_off, n, d_off, R, rr, rj, BLOCK_R, BLOCK_N, 64, PRECISION)
    return q, rj


@triton.jit
def gram_share(q, D, Q, Gp, pid, d_off, n, R, rr, rj, cols, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """Store the program's block of Q (rows rr, columns rj) and its share of the Gram rows,
    q D[:, rj]^T, into the program's slot of Gp (added up by ``_gram_reduce_kernel``)."""
    tl.store(Q + d_off + rr[:, None] * n + rj[None, :], q, mask=(rr[:, None] < R) & (rj[None, :] < n))
    gp = Gp + pid.to(tl.int64) * BLOCK_R * cols
    for c0 in range(0, R, BLOCK_R):
        rc = c0 + tl.arange(0, BLOCK_R)
        dc = tl.load(D + d_off + rc[:, None] * n + rj[None, :],
                     mask=(rc[:, None] < R) & (rj[None, :] < n), other=0.0)
        g = tl.dot(q, tl.trans(dc), input_precision=PRECISION)
        tl.store(gp + tl.arange(0, BLOCK_R)[:, None] * cols + rc[None, :], g, mask=rc[None, :] < R)


@triton.jit
def _gram_panels_kernel(D, S, Q, Gp, items, work, w_start, cols, BLOCK_R: tl.constexpr,
                        BLOCK_N: tl.constexpr, TILE: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    rt, cj, n, R, d_off, s_off, g_off = work_item(items, work, w_start + pid)
    rr = rt * BLOCK_R + tl.arange(0, BLOCK_R)
    q, rj = panel(D, S, s_off, n, d_off, R, rr, cj, BLOCK_R, BLOCK_N, TILE, PRECISION)
    gram_share(q, D, Q, Gp, pid, d_off, n, R, rr, rj, cols, BLOCK_R, PRECISION)


@triton.jit
def _gram_reduce_kernel(Gp, G, items, pairs, p_start, cols, BLOCK_R: tl.constexpr, ONLY_WIDE: tl.constexpr):
    """G's row tile of one (item, row tile) pair: the sum of its column blocks' shares, in order.
    ONLY_WIDE: only items of several row tiles (the others wrote no shares: ``grouped_gram_quad``)."""
    p = p_start + tl.program_id(0)
    item = tl.load(pairs + 4 * p)
    rt = tl.load(pairs + 4 * p + 1)
    first = tl.load(pairs + 4 * p + 2)
    blocks = tl.load(pairs + 4 * p + 3)
    R = tl.load(items + ITEM_FIELDS * item + ITEM_R)
    g_off = tl.load(items + ITEM_FIELDS * item + ITEM_G_OFF)
    rr = rt * BLOCK_R + tl.arange(0, BLOCK_R)
    local = tl.arange(0, BLOCK_R)
    for c0 in range(0, tl.where(ONLY_WIDE and R <= BLOCK_R, 0, R), BLOCK_R):
        rc = c0 + tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
        for k in range(0, blocks):
            base = Gp + (first + k).to(tl.int64) * BLOCK_R * cols
            acc += tl.load(base + local[:, None] * cols + rc[None, :], mask=rc[None, :] < R, other=0.0)
        tl.store(G + g_off + rr[:, None] * R + rc[None, :], acc, mask=(rr[:, None] < R) & (rc[None, :] < R))


def check_gram_operands(D: torch.Tensor, arena: torch.Tensor, tile: int) -> None:
    if arena.dtype not in (torch.float32, torch.bfloat16) or D.dtype != torch.float32:
        raise ValueError(f"the Triton grouped product takes fp32 D and an fp32 or bf16 arena, got {D.dtype}, "
                         f"{arena.dtype}")
    if tile:
        check_tile(tile)


def grouped_gram(D: torch.Tensor, arena: torch.Tensor, classes: list[int], tile: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher: D flat fp32, arena flat fp32/bf16 (dense factors for tile 0, else tile-packed)."""
    D = D.float()
    check_gram_operands(D, arena, tile)
    tab = triton_tables(tuple(classes), tile, str(D.device))
    Q = torch.zeros_like(D)
    G = torch.zeros(gram_numel(classes), dtype=torch.float32, device=D.device)
    b = tab.buckets
    for k in range(0, len(b), 6):
        w0, w1, p0, p1, br, cols = b[k:k + 6]
        Gp = torch.empty((w1 - w0) * br * cols, dtype=torch.float32, device=D.device)
        _gram_panels_kernel[(w1 - w0,)](D, arena, Q, Gp, tab.items, tab.work, w0, cols, BLOCK_R=br,
                                        BLOCK_N=tile or DENSE_PANEL, TILE=tile, PRECISION=FP32_DOT,
                                        num_warps=4, num_stages=3)
        _gram_reduce_kernel[(p1 - p0,)](Gp, G, tab.items, tab.pairs, p0, cols, BLOCK_R=br, ONLY_WIDE=False,
                                        num_warps=4)
    return G, Q
