"""``lalora::grouped_gram_quad`` on Triton: the kfac/tri penalty with its epilogue fused behind the
products.

    v = 1/2 sum_k <C_k, G_k>,   dD_k = (W_k + W_k^T) Q_k,   W_k = C_k / 2,   G_k = Q_k D_k^T

A program of the product kernels (``grouped_gram.panel``) holds the block
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

from ..gram_meta import DENSE_PANEL, block_r, gram_numel, read_classes, triton_tables
from ..reference.grouped_gram import class_views
from .common import FP32_DOT
from .grouped_gram import _gram_reduce_kernel, check_gram_operands, gram_share, panel, work_item


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
def _quad_panels_kernel(D, S, Q, Gp, C, dD, Vp, items, work, w_start, cols, BLOCK_R: tl.constexpr,
                        BLOCK_N: tl.constexpr, TILE: tl.constexpr, GRAD: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    rt, cj, n, R, d_off, s_off, g_off = work_item(items, work, w_start + pid)
    rr = rt * BLOCK_R + tl.arange(0, BLOCK_R)
    q, rj = panel(D, S, s_off, n, d_off, R, rr, cj, BLOCK_R, BLOCK_N, TILE, PRECISION)
    if R <= BLOCK_R:
        quad_share(q, D, C, dD, Vp, pid, d_off, g_off, n, R, rj, BLOCK_R, GRAD, PRECISION)
    else:
        tl.store(Vp + pid, 0.0)
        gram_share(q, D, Q, Gp, pid, d_off, n, R, rr, rj, cols, BLOCK_R, PRECISION)


def grouped_gram_quad(D: torch.Tensor, arena: torch.Tensor, classes: list[int], tile: int, C: torch.Tensor,
                      grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher: D flat fp32, arena flat fp32/bf16 (dense factors for tile 0, else tile-packed), C
    like G. Returns (v, dD or empty)."""
    D = D.float()
    check_gram_operands(D, arena, tile)
    g_size = gram_numel(classes)
    C = C.to(torch.float32)
    tab = triton_tables(tuple(classes), tile, str(D.device))
    ranks = [c.R for c in read_classes(classes)]
    wide = [R > block_r(R) for R in ranks]                     # classes with several row tiles
    dD = torch.zeros_like(D) if grad else D.new_empty(0)
    unused = D.new_empty(0)        # for pointers a launch never writes through (never an input)
    Q = torch.zeros_like(D) if any(wide) else unused
    G = torch.zeros(g_size, dtype=torch.float32, device=D.device) if any(wide) else unused
    b = tab.buckets
    Vp = torch.empty(b[-5] if b else 0, dtype=torch.float32, device=D.device)     # a share per program
    for k in range(0, len(b), 6):
        w0, w1, p0, p1, br, cols = b[k:k + 6]
        two_pass = any(w and block_r(R) == br for w, R in zip(wide, ranks))
        Gp = torch.empty((w1 - w0) * br * cols, dtype=torch.float32, device=D.device) if two_pass else unused
        _quad_panels_kernel[(w1 - w0,)](
            D, arena, Q, Gp, C, dD if grad else unused, Vp[w0:w1], tab.items, tab.work, w0, cols, BLOCK_R=br,
            BLOCK_N=tile or DENSE_PANEL, TILE=tile, GRAD=grad, PRECISION=FP32_DOT, num_warps=4, num_stages=3)
        if two_pass:
            _gram_reduce_kernel[(p1 - p0,)](Gp, G, tab.items, tab.pairs, p0, cols, BLOCK_R=br, ONLY_WIDE=True,
                                            num_warps=4)
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
