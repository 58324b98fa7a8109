"""Launch policy shared by the kernels: block sizes, N-splitting, dot precision."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Programs wanted per launch before the token axis is split (about 2 waves on an H200's 132 SMs).
TARGET_PROGRAMS = 264
# fp32 operands: "ieee" under the interpreter (exact), 3xTF32 on the GPU (fp32-class accuracy).
FP32_DOT = "ieee" if INTERPRET else "tf32x3"


def launch(kernel):
    """``kernel`` launchable from a ``triton_op``: ``wrap_triton(kernel)``, so that torch.compile
    sees the launch; under the interpreter the kernel itself (before Triton 3.8 the interpreter's
    ``triton.jit`` returns a function that ``wrap_triton`` refuses)."""
    if INTERPRET:
        return kernel
    from torch.library import wrap_triton
    return wrap_triton(kernel)


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
