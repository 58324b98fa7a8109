"""``lalora::cov_update_`` on Triton: ``S += w * X^T diag(m) X`` (SPEC sections 2 and 7).

S: (n, n) fp32, in place; X: (N, n) bf16/fp16/fp32 (row stride free, column stride 1 or not);
m: (N,) 0/1 or None; w: fp32 scalar. Only upper-triangle tiles (I <= J) are computed; each
writes its mirror, and diagonal tiles are symmetrised, so S stays bitwise symmetric. When n is
small and N large, the token axis is split over programs; the splits write private partial
sums that are added in a fixed order (deterministic: same bits run to run).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import INTERPRET, check_operands, dot_precision, live_rows, split_rows


@triton.jit
def syrk_tile(X, M, ri, rj, N, n, split, rows_per_split, stride_xn, stride_xk, w, diagonal,
              HAS_MASK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
              PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """w * X[rows of this split, ri]^T X[rows, rj] in fp32, masked rows skipped; a diagonal tile
    comes back exactly symmetric (its upper half mirrored). Shared by the dense and packed kernels."""
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, N)
    for k0 in range(start, end, BLOCK_K):
        rk = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)      # N x n can pass 2^31
        live = live_rows(M, rk, end, HAS_MASK)
        a = tl.load(X + rk[:, None] * stride_xn + ri[None, :] * stride_xk,
                    mask=live[:, None] & (ri[None, :] < n), other=0.0)
        b = tl.load(X + rk[:, None] * stride_xn + rj[None, :] * stride_xk,
                    mask=live[:, None] & (rj[None, :] < n), other=0.0)
        if UPCAST:    # the interpreter has no bf16 dot; bf16 products are exact in fp32 anyway
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(tl.trans(a), b, input_precision=PRECISION)
    acc = acc * w
    if diagonal:
        acc = tl.where(ri[:, None] <= rj[None, :], acc, tl.trans(acc))
    return acc


@triton.jit
def _syrk_kernel(X, M, P, N, n, rows_per_split, stride_xn, stride_xk, stride_ps, w,
                 HAS_MASK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    nt = tl.cdiv(n, BLOCK)
    tile = tl.program_id(0)
    split = tl.program_id(1)
    ti = tile // nt
    tj = tile % nt
    if tj < ti:
        return
    ri = ti * BLOCK + tl.arange(0, BLOCK)
    rj = tj * BLOCK + tl.arange(0, BLOCK)
    acc = syrk_tile(X, M, ri, rj, N, n, split, rows_per_split, stride_xn, stride_xk, w, ti == tj,
                    HAS_MASK, BLOCK, BLOCK_K, PRECISION, UPCAST)
    base = P + split.to(tl.int64) * stride_ps
    inside = (ri[:, None] < n) & (rj[None, :] < n)
    p_ij = base + ri[:, None] * n + rj[None, :]
    tl.store(p_ij, tl.load(p_ij, mask=inside, other=0.0) + acc, mask=inside)
    if ti != tj:
        p_ji = base + rj[:, None] * n + ri[None, :]
        inside_t = (rj[:, None] < n) & (ri[None, :] < n)
        tl.store(p_ji, tl.load(p_ji, mask=inside_t, other=0.0) + tl.trans(acc), mask=inside_t)


def cov_update_(S: torch.Tensor, X: torch.Tensor, mask: Optional[torch.Tensor], weight: float,
                splits: Optional[int] = None) -> None:
    """Launcher; ``splits`` forces the token-axis split (tests), otherwise it is chosen from shape."""
    check_operands(S, X)
    n = S.shape[0]
    X = X.reshape(-1, n)
    N = X.shape[0]
    if N == 0:
        return
    if not S.is_contiguous():
        raise ValueError("S must be contiguous for the Triton covariance update")
    m = None if mask is None else mask.reshape(-1).to(device=X.device, dtype=torch.int8)
    block = 64 if INTERPRET or n <= 1024 else 128
    nt = triton.cdiv(n, block)
    tiles = nt * (nt + 1) // 2
    k, rows = split_rows(tiles, N, splits)
    P = S if k == 1 else torch.zeros((k, n, n), dtype=torch.float32, device=S.device)
    _syrk_kernel[(nt * nt, k)](
        X, m if m is not None else X, P, N, n, rows, X.stride(0), X.stride(1),
        0 if k == 1 else P.stride(0), float(weight), HAS_MASK=m is not None, BLOCK=block,
        BLOCK_K=64, PRECISION=dot_precision(X.dtype), UPCAST=INTERPRET,
        num_warps=8 if block == 128 else 4, num_stages=2 if block == 128 and X.dtype == torch.float32 else 3)
    if k > 1:
        S.add_(P.sum(0))
