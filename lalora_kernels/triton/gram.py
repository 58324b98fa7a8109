"""The penalty's factor product for a batch of bundles: ``Q = D S``, ``G = D S D^T`` (SPEC section 4).

D: (b, R, n) fp32/bf16/fp16, any strides (the stacked LoRA deltas of each bundle); S: (b, n, n)
fp32 symmetric (the factor each bundle shares); R <= 256. Program (bundle, J) reads the column
panel S[:, J] once, forms Q[:, J] = D S[:, J] in registers and its share Q[:, J] D[:, J]^T of the
Gram; the panels' shares are added in a fixed order, so G is deterministic. Every factor element
is read exactly once per call: the launch is bound by the bytes of S.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .common import FP32_DOT

MAX_R = 256


@triton.jit
def _gram_kernel(D, S, Q, Gp, R, n, sd_b, sd_r, sd_n, ss_b, ss_r, ss_c, sq_b, sq_r, sg_b, sg_j,
                 BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr):
    bi = tl.program_id(0)
    pj = tl.program_id(1)
    rr = tl.arange(0, BLOCK_R)
    rj = pj * BLOCK_N + tl.arange(0, BLOCK_N)
    d_base = D + bi * sd_b
    s_base = S + bi * ss_b
    q = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, n, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        d = tl.load(d_base + rr[:, None] * sd_r + rk[None, :] * sd_n,
                    mask=(rr[:, None] < R) & (rk[None, :] < n), other=0.0).to(tl.float32)
        s = tl.load(s_base + rk[:, None] * ss_r + rj[None, :] * ss_c,
                    mask=(rk[:, None] < n) & (rj[None, :] < n), other=0.0)
        q += tl.dot(d, s, input_precision=PRECISION)
    tl.store(Q + bi * sq_b + rr[:, None] * sq_r + rj[None, :], q,
             mask=(rr[:, None] < R) & (rj[None, :] < n))
    dj = tl.load(d_base + rr[:, None] * sd_r + rj[None, :] * sd_n,
                 mask=(rr[:, None] < R) & (rj[None, :] < n), other=0.0).to(tl.float32)
    g = tl.dot(q, tl.trans(dj), input_precision=PRECISION)
    tl.store(Gp + bi * sg_b + pj * sg_j + rr[:, None] * BLOCK_R + rr[None, :], g)


def sym_gram(D: torch.Tensor, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, R, n = D.shape
    if S.dtype != torch.float32:
        raise ValueError(f"the Triton sym_gram reads fp32 factors, got {S.dtype}")
    if R > MAX_R:
        raise ValueError(f"the Triton sym_gram handles up to {MAX_R} stacked rows per bundle, got {R}")
    block_r = max(16, triton.next_power_of_2(R))
    block_n = 64
    panels = triton.cdiv(n, block_n)
    Q = torch.empty((b, R, n), dtype=torch.float32, device=D.device)
    Gp = torch.empty((b, panels, block_r, block_r), dtype=torch.float32, device=D.device)
    wrap_triton(_gram_kernel)[(b, panels)](
        D, S, Q, Gp, R, n, D.stride(0), D.stride(1), D.stride(2), S.stride(0), S.stride(1), S.stride(2),
        Q.stride(0), Q.stride(1), Gp.stride(0), Gp.stride(1),
        BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_K=64, PRECISION=FP32_DOT,
        num_warps=4 if block_r <= 64 else 8, num_stages=3)
    G = Gp.sum(1)[:, :R, :R].contiguous()
    return G, Q
