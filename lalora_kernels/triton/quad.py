"""``grouped_gram_quad`` on Triton: the kfac/tri penalty with its epilogue fused behind the products.

    v = 1/2 sum_k <C_k, G_k>,   dD_k = (W_k + W_k^T) Q_k,   W_k = C_k / 2,   G_k = Q_k D_k^T

A program of the product kernels (``gram.dense_panel``, ``packed.packed_panel``) holds the block
``Q_k[rows, J]``. When its row tile holds every row of the item (R <= BLOCK_R: R <= 64), every term
is tile-local (SPEC section 4): the value's share is ``1/2 sum((C^T Q)[:, J] * D[:, J])`` and the
gradient's column block is ``(W + W^T) Q[:, J]``, with the R x R weights in registers. Such a program
writes its gradient block and one scalar; neither Q nor G is written or read back. Items with more
rows (several row tiles add into every gradient block) keep the two-pass path: Q and the Gram
shares are written, the shares reduced, and their epilogue runs as torch ops. Value shares are
added in a fixed order, so the value is the same bits run to run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..grouping import GramLayout
from ..reference import class_views, gram_numel
from .common import FP32_DOT, launch
from .gram import PANEL, _gram_reduce_kernel, check_gram_operands, dense_panel, gram_share, work_item
from .packed import _check_tile, packed_panel


@triton.jit
def quad_share(q, D, C, dD, Vp, pid, d_off, g_off, n, R, rj, BLOCK_R: tl.constexpr, GRAD: tl.constexpr,
               PRECISION: tl.constexpr):
    """Value share and gradient block of a program whose row tile holds all R rows of its item, in
    chunks of 16 rows b: Y = (C^T Q)[b, J] gives the value share sum(Y * D[b, J]) / 2 (as <C, Q D^T>
    = sum((C^T Q) * D)) and the gradient rows (C Q + Y)[b, J] / 2. Chunks keep C's registers small."""
    loc = tl.arange(0, BLOCK_R)
    mj = rj < n
    v = 0.0
    for b0 in range(0, R, 16):
        rb = b0 + tl.arange(0, 16)
        cm = (rb[:, None] < R) & (loc[None, :] < R)
        dm = (rb[:, None] < R) & mj[None, :]
        ct = tl.load(C + g_off + loc[None, :] * R + rb[:, None], mask=cm, other=0.0)      # C^T[b, :]
        y = tl.dot(ct, q, input_precision=PRECISION)
        d = tl.load(D + d_off + rb[:, None] * n + rj[None, :], mask=dm, other=0.0)
        v += tl.sum(y * d)
        if GRAD:
            c = tl.load(C + g_off + rb[:, None] * R + loc[None, :], mask=cm, other=0.0)    # C[b, :]
            g = 0.5 * (tl.dot(c, q, input_precision=PRECISION) + y)
            tl.store(dD + d_off + rb[:, None] * n + rj[None, :], g, mask=dm)
    tl.store(Vp + pid, 0.5 * v)


@triton.jit
def _quad_panels_kernel(D, S, Q, Gp, C, dD, Vp, items, work, w_start, cols,
                        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        TILE: tl.constexpr, GRAD: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    rt, pj, s_off, n, d_off, R = work_item(items, work, w_start + pid)
    g_off = tl.load(items + 5 * tl.load(work + 3 * (w_start + pid)) + 4)
    rr = rt * BLOCK_R + tl.arange(0, BLOCK_R)
    rj = pj * BLOCK_N + tl.arange(0, BLOCK_N)
    if TILE > 0:            # tile-packed factor: BLOCK_N == TILE, column block pj is tile column pj
        q = packed_panel(D, S, s_off, n, d_off, R, rr, pj, BLOCK_R, TILE, PRECISION)
    else:
        q = dense_panel(D, S, s_off, n, d_off, R, rr, rj, BLOCK_R, BLOCK_N, BLOCK_K, PRECISION)
    if R <= BLOCK_R:
        quad_share(q, D, C, dD, Vp, pid, d_off, g_off, n, R, rj, BLOCK_R, GRAD, PRECISION)
    else:
        tl.store(Vp + pid, 0.0)
        gram_share(q, D, Q, Gp, pid, d_off, n, R, rr, rj, cols, BLOCK_R, PRECISION)


def grouped_gram_quad(D: torch.Tensor, arena: torch.Tensor, items: torch.Tensor, work: torch.Tensor,
                      pairs: torch.Tensor, plan: list[int], classes: list[int], tile: int, C: torch.Tensor,
                      grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher: D (d_size,) fp32, arena fp32/bf16 (dense factors for tile 0, else tile-packed), C
    like G, tables from ``GramLayout(classes, tile=tile).tables()``. Returns (v, dD or empty)."""
    check_gram_operands(D, arena)
    if tile:
        _check_tile(tile)
    g_size = gram_numel(classes)
    if C.numel() != g_size:
        raise ValueError(f"C has {C.numel()} numbers; it must hold {g_size} (one per entry of G)")
    C = C.to(torch.float32)
    ranks = classes[1::6]
    wide = [R > GramLayout.block_r(R) for R in ranks]           # classes with several row tiles
    dD = torch.empty_like(D) if grad else D.new_empty(0)
    unused = D.new_empty(0)        # for pointers a launch never writes through (never an input)
    Q = torch.empty_like(D) if any(wide) else unused
    G = torch.empty(g_size, dtype=torch.float32, device=D.device) if any(wide) else unused
    Vp = torch.empty(plan[-5] if plan else 0, dtype=torch.float32, device=D.device)  # a share per program
    for b in range(0, len(plan), 6):
        w0, w1, p0, p1, br, cols = plan[b:b + 6]
        two_pass = any(w and GramLayout.block_r(R) == br for w, R in zip(wide, ranks))
        Gp = torch.empty((w1 - w0) * br * cols, dtype=torch.float32, device=D.device) if two_pass else unused
        launch(_quad_panels_kernel)[(w1 - w0,)](
            D, arena, Q, Gp, C, dD if grad else unused, Vp[w0:w1], items, work, w0, cols, BLOCK_R=br,
            BLOCK_N=tile or PANEL, BLOCK_K=64, TILE=tile, GRAD=grad, PRECISION=FP32_DOT,
            num_warps=4, num_stages=3)
        if two_pass:
            launch(_gram_reduce_kernel)[(p1 - p0,)](Gp, G, items, pairs, p0, cols, BLOCK_R=br,
                                                          ONLY_WIDE=True, num_warps=4)
    v = Vp.sum()                   # shares in work order: the same bits run to run
    if any(wide):             # the epilogue of the items with several row tiles, as torch ops
        views = zip(wide, class_views(C, classes, "G"), class_views(G, classes, "G"),
                    class_views(Q, classes, "D"), class_views(dD, classes, "D") if grad else wide)
        for w, c, g, q, d in views:
            if w:
                v = v + 0.5 * torch.dot(c.reshape(-1), g.reshape(-1))
                if grad:
                    d.copy_(torch.bmm(0.5 * (c + c.transpose(1, 2)), q))
    return v, dD
