"""The penalty's factor product for every adapter of a model at once (SPEC section 4):

    for every item k:   Q_k = D_k S_k,   G_k = D_k S_k D_k^T

All factors live in one flat fp32 arena, all stacked rows ``D_k`` (R_k x n_k) in one flat buffer,
addressed through an offset table ``items`` [s_off, n, d_off, R, g_off] (no pointer-to-pointer
loads). One launch per row-block size covers every item: program (item, row tile, panel J) reads
the column panel S_k[:, J] once, forms Q_k[rows, J] and its share of the Gram rows; a second small
launch adds the panels' shares in a fixed order (deterministic G). Every factor element is read
once per call, so the work is bound by the bytes of the arena.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import FP32_DOT, launch

PANEL = 64


@triton.jit
def work_item(items, work, w):
    """Row tile, column block and the item's [s_off, n, d_off, R] for work entry w."""
    item = tl.load(work + 3 * w)
    rt = tl.load(work + 3 * w + 1)
    pj = tl.load(work + 3 * w + 2)
    s_off = tl.load(items + 5 * item)
    n = tl.load(items + 5 * item + 1)
    d_off = tl.load(items + 5 * item + 2)
    R = tl.load(items + 5 * item + 3)
    return rt, pj, s_off, n, d_off, R


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
def _gram_panels_kernel(D, S, Q, Gp, items, work, w_start, cols,
                        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    rt, pj, s_off, n, d_off, R = work_item(items, work, w_start + pid)
    rr = rt * BLOCK_R + tl.arange(0, BLOCK_R)
    rj = pj * BLOCK_N + tl.arange(0, BLOCK_N)
    q = dense_panel(D, S, s_off, n, d_off, R, rr, rj, BLOCK_R, BLOCK_N, BLOCK_K, PRECISION)
    gram_share(q, D, Q, Gp, pid, d_off, n, R, rr, rj, cols, BLOCK_R, PRECISION)


@triton.jit
def _gram_reduce_kernel(Gp, G, items, pairs, p_start, cols, BLOCK_R: tl.constexpr, ONLY_WIDE: tl.constexpr):
    """G's row tile of one (item, row tile) pair: the sum of its panels' shares, in panel order.
    ONLY_WIDE: only items of several row tiles (the others wrote no shares: ``quad``)."""
    p = p_start + tl.program_id(0)
    item = tl.load(pairs + 4 * p)
    rt = tl.load(pairs + 4 * p + 1)
    first = tl.load(pairs + 4 * p + 2)
    panels = tl.load(pairs + 4 * p + 3)
    R = tl.load(items + 5 * item + 3)
    g_off = tl.load(items + 5 * item + 4)
    rr = rt * BLOCK_R + tl.arange(0, BLOCK_R)
    local = tl.arange(0, BLOCK_R)
    for c0 in range(0, tl.where(ONLY_WIDE and R <= BLOCK_R, 0, R), BLOCK_R):
        rc = c0 + tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
        for k in range(0, panels):
            base = Gp + (first + k).to(tl.int64) * BLOCK_R * cols
            acc += tl.load(base + local[:, None] * cols + rc[None, :], mask=rc[None, :] < R, other=0.0)
        tl.store(G + g_off + rr[:, None] * R + rc[None, :], acc, mask=(rr[:, None] < R) & (rc[None, :] < R))


def check_gram_operands(D: torch.Tensor, arena: torch.Tensor) -> None:
    if arena.dtype not in (torch.float32, torch.bfloat16) or D.dtype != torch.float32:
        raise ValueError(f"the Triton grouped product takes fp32 D and an fp32 or bf16 arena, got {D.dtype}, "
                         f"{arena.dtype}")


def launch_buckets(panels_kernel, D: torch.Tensor, arena: torch.Tensor, items: torch.Tensor,
                   work: torch.Tensor, pairs: torch.Tensor, plan: list[int], g_size: int, **meta
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch of ``panels_kernel`` per row-block bucket of ``plan``, each followed by the
    deterministic reduction of its Gram shares; shared by the dense and packed launchers."""
    check_gram_operands(D, arena)
    Q = torch.empty_like(D)
    G = torch.empty(g_size, dtype=torch.float32, device=D.device)
    for b in range(0, len(plan), 6):
        w0, w1, p0, p1, br, cols = plan[b:b + 6]
        Gp = torch.empty((w1 - w0) * br * cols, dtype=torch.float32, device=D.device)
        launch(panels_kernel)[(w1 - w0,)](D, arena, Q, Gp, items, work, w0, cols, BLOCK_R=br,
                                              PRECISION=FP32_DOT, num_warps=4, num_stages=3, **meta)
        launch(_gram_reduce_kernel)[(p1 - p0,)](Gp, G, items, pairs, p0, cols, BLOCK_R=br,
                                                      ONLY_WIDE=False, num_warps=4)
    return G, Q


def grouped_gram(D: torch.Tensor, arena: torch.Tensor, items: torch.Tensor, work: torch.Tensor,
                 pairs: torch.Tensor, plan: list[int], g_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher: D (d_size,) fp32, arena (s_size,) fp32, tables from ``GramLayout.tables``."""
    return launch_buckets(_gram_panels_kernel, D, arena, items, work, pairs, plan, g_size,
                          BLOCK_N=PANEL, BLOCK_K=64)
