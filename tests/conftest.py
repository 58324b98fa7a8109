import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels are tested in the interpreter; it must be chosen before any
# kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))

# ---- the tolerance policy (one rule for the suite) ----------------------------------------------
# A result computed in a low-precision dtype is compared with a float64 oracle, and its error may be
# at most TORCH_FACTOR times PyTorch's own error on the same computation in the same dtype (the
# baseline a user would otherwise run), with a floor of FLOOR_ULPS units of the result's scale for
# when PyTorch happens to be exact. float64 results therefore sit within a few ulps of the oracle.
TORCH_FACTOR = 8.0
FLOOR_ULPS = 8


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.detach().double().cpu() - ref.detach().double().cpu()).abs().max()) if ref.numel() else 0.0


def assert_close_like_torch(got: torch.Tensor, ref: torch.Tensor, baseline: torch.Tensor, scale=None) -> None:
    """``got``'s error against the float64 ``ref`` is at most TORCH_FACTOR times ``baseline``'s (the
    same quantity from plain PyTorch in the same dtype), floor FLOOR_ULPS ulps of ``scale`` (default
    ``ref``'s largest entry; for a sum that cancels, the sum of its terms' magnitudes)."""
    assert got.shape == ref.shape, (got.shape, ref.shape)
    if scale is None:
        scale = float(ref.detach().abs().max()) if ref.numel() else 0.0
    floor = FLOOR_ULPS * torch.finfo(baseline.dtype).eps * scale
    bound = TORCH_FACTOR * max(max_err(baseline, ref), floor)
    err = max_err(got, ref)
    assert err <= bound, f"error {err:.3g} > {bound:.3g} ({TORCH_FACTOR}x PyTorch's {max_err(baseline, ref):.3g})"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


# ---- backends -----------------------------------------------------------------------------------
def available_backends() -> list[str]:
    from lalora_kernels import _cpp, ops
    return ["torch"] + (["cpp"] if _cpp.available() else []) + (["triton"] if ops.HAS_TRITON else [])


DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=available_backends())
def backend(request, monkeypatch):
    """Every backend this machine has: the reference, C++ (CPU) and Triton (CUDA, or the
    interpreter on the CPU), selected through LALORA_BACKEND as a user would."""
    monkeypatch.setenv("LALORA_BACKEND", request.param)
    return request.param
