"""``lalora::sqcov_update_`` on Triton (the ``diag`` curvature): ``F += w * (G*G)^T diag(m) (X*X)``.

F: (p, q) fp32, in place; G: (N, p), X: (N, q) bf16/fp16/fp32; m: (N,) 0/1 or None. The squares
are formed in registers in fp32 and never stored. Token-axis splitting and the deterministic
reduction follow ``cov_update``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import FP32_DOT, check_operands, live_rows, split_rows


@triton.jit
def _sq_gemm_kernel(G, X, M, P, N, p, q, rows_per_split, stride_gn, stride_gk, stride_xn, stride_xk,
                    stride_ps, w, HAS_MASK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
                    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    tq = tl.cdiv(q, BLOCK_Q)
    tile = tl.program_id(0)
    split = tl.program_id(1)
    rp = (tile // tq) * BLOCK_P + tl.arange(0, BLOCK_P)
    rq = (tile % tq) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, N)
    for k0 in range(start, end, BLOCK_K):
        rk = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)      # N x n can pass 2^31
        live = live_rows(M, rk, end, HAS_MASK)
        g = tl.load(G + rk[:, None] * stride_gn + rp[None, :] * stride_gk,
                    mask=live[:, None] & (rp[None, :] < p), other=0.0).to(tl.float32)
        x = tl.load(X + rk[:, None] * stride_xn + rq[None, :] * stride_xk,
                    mask=live[:, None] & (rq[None, :] < q), other=0.0).to(tl.float32)
        acc += tl.dot(tl.trans(g * g), x * x, input_precision=PRECISION)
    inside = (rp[:, None] < p) & (rq[None, :] < q)
    ptr = P + split.to(tl.int64) * stride_ps + rp[:, None] * q + rq[None, :]
    tl.store(ptr, tl.load(ptr, mask=inside, other=0.0) + acc * w, mask=inside)


def sqcov_update_(F: torch.Tensor, G: torch.Tensor, X: torch.Tensor, mask: Optional[torch.Tensor],
                  weight: float, splits: Optional[int] = None) -> None:
    check_operands(F, G, X)
    p, q = F.shape
    G, X = G.reshape(-1, p), X.reshape(-1, q)
    N = G.shape[0]
    if X.shape[0] != N:
        raise ValueError(f"G has {N} rows but X has {X.shape[0]}; they must be the same tokens")
    if N == 0:
        return
    if not F.is_contiguous():
        raise ValueError("F must be contiguous for the Triton squared-operand update")
    m = None if mask is None else mask.reshape(-1).to(device=G.device, dtype=torch.int8)
    bp, bq = 64, 64
    tiles = triton.cdiv(p, bp) * triton.cdiv(q, bq)
    k, rows = split_rows(tiles, N, splits)
    P = F if k == 1 else torch.zeros((k, p, q), dtype=torch.float32, device=F.device)
    _sq_gemm_kernel[(tiles, k)](
        G, X, m if m is not None else G, P, N, p, q, rows, G.stride(0), G.stride(1), X.stride(0),
        X.stride(1), 0 if k == 1 else P.stride(0), float(weight), HAS_MASK=m is not None,
        BLOCK_P=bp, BLOCK_Q=bq, BLOCK_K=64, PRECISION=FP32_DOT, num_warps=4, num_stages=3)
    if k > 1:
        F.add_(P.sum(0))
