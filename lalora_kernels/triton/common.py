"""Shared by the Triton kernels: launch policy (token-axis splits, dot precision), the item-table
columns, operand checks."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..gram_meta import ClassField

# Columns of an item row of ``gram_meta.triton_tables`` (the class table's field order).
ITEM_FIELDS = tl.constexpr(len(ClassField))
ITEM_N = tl.constexpr(int(ClassField.n))
ITEM_R = tl.constexpr(int(ClassField.R))
ITEM_D_OFF = tl.constexpr(int(ClassField.d_off))
ITEM_S_OFF = tl.constexpr(int(ClassField.s_off))
ITEM_G_OFF = tl.constexpr(int(ClassField.g_off))

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Programs wanted per launch before the token axis is split (about 2 waves on an H200's 132 SMs).
TARGET_PROGRAMS = 264
# fp32 operands: "ieee" under the interpreter (exact), 3xTF32 on the GPU (fp32-class accuracy).
FP32_DOT = "ieee" if INTERPRET else "tf32x3"


def dot_precision(dtype: torch.dtype) -> str:
    return FP32_DOT if dtype == torch.float32 else "ieee"


def split_rows(tiles: int, N: int, force: int | None = None, min_rows: int = 512) -> tuple[int, int]:
    """(chunks, rows per chunk) for the token axis, so that small factors still fill the GPU."""
    if force is not None:
        k = max(1, min(force, N))
    elif tiles >= TARGET_PROGRAMS:
        k = 1
    else:
        k = max(1, min(triton.cdiv(TARGET_PROGRAMS, tiles), triton.cdiv(N, min_rows)))
    rows = triton.cdiv(N, k)
    return triton.cdiv(N, rows), rows


@triton.jit
def live_rows(M, rk, end, HAS_MASK: tl.constexpr):
    """Token rows of this chunk that count: inside the chunk and, with a mask, not padding."""
    live = rk < end
    if HAS_MASK:
        live = live & (tl.load(M + rk, mask=rk < end, other=0) != 0)
    return live


def check_operands(acc: torch.Tensor, *inputs: torch.Tensor) -> None:
    if acc.dtype != torch.float32:
        raise ValueError(f"Triton kernels accumulate in float32; got a {acc.dtype} accumulator "
                         "(float64 work runs on the torch backend: LALORA_BACKEND=torch)")
    for t in inputs:
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"Triton kernels take fp32/bf16/fp16 inputs, got {t.dtype}")
        if t.device != acc.device:
            raise ValueError(f"inputs on {t.device} but the accumulator is on {acc.device}")
