"""lalora::cov_update_ (S += w X^T diag(m) X) on every backend against float64."""
import pytest
import torch
from conftest import DEV, assert_close_like_torch
from problems import spd

from lalora_kernels import ops as lops

ops = torch.ops.lalora


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _case(n, N, dtype, masked, device="cpu"):
    X = torch.randn(N, n).to(dtype)
    mask = (torch.rand(N) > 0.4) if masked else None
    S0 = spd(n)
    Xd = X.double() if mask is None else X.double()[mask]
    ref = S0 + 0.75 * Xd.T @ Xd
    Xa = X.to(_acc(dtype)) if mask is None else X.to(_acc(dtype))[mask]          # PyTorch in the same dtype
    baseline = S0.to(_acc(dtype)) + 0.75 * Xa.T @ Xa
    return X.to(device), None if mask is None else mask.to(device), S0.to(device, _acc(dtype)), ref, baseline


@pytest.mark.parametrize("n", [1, 7, 63, 129, 300])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_float64(backend, n, dtype, masked):
    X, mask, S, ref, baseline = _case(n, 37, dtype, masked, DEV)
    ops.cov_update_(S, X, mask, 0.75)
    assert_close_like_torch(S, ref, baseline)
    assert torch.equal(S, S.T), "a symmetric accumulator stays exactly symmetric"


def test_leading_dims_and_all_masked(backend):
    X = torch.randn(2, 5, 9, dtype=torch.float32)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    S = torch.zeros(9, 9)
    ops.cov_update_(S, X, mask, 1.0)
    Xv = torch.stack([X[0, 0], X[0, 1], X[1, 0]]).double()
    assert_close_like_torch(S, Xv.T @ Xv, (Xv.T @ Xv).float())
    before = S.clone()
    ops.cov_update_(S, X, torch.zeros(2, 5), 1.0)
    assert torch.equal(S, before)


def test_opcheck(backend):
    S = spd(9).float()
    X, mask = torch.randn(3, 4, 9), torch.rand(3, 4) > 0.5
    torch.library.opcheck(ops.cov_update_, (S.clone(), X, mask, 0.5))
    torch.library.opcheck(ops.cov_update_, (S.clone(), X, None, 1.0))


@pytest.mark.skipif(not lops.HAS_TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("splits", [1, 3, None])
def test_triton_token_splits_are_deterministic(dtype, splits):
    """The Triton kernel splits the token axis when the factor is small: private partial sums
    added in a fixed order, so the same bits every run."""
    from lalora_kernels.triton.cov_update import cov_update_
    N, n = 700, 129
    X = torch.randn(N, n, device=DEV).to(dtype)
    mask = torch.ones(N, dtype=torch.long, device=DEV)
    mask[500:] = 0
    S = torch.zeros(n, n, device=DEV)
    cov_update_(S, X, mask, 1.0, splits=splits)
    Xd = X.double().cpu()[:500]
    assert_close_like_torch(S, Xd.T @ Xd, (X.float().cpu()[:500].T @ X.float().cpu()[:500]))
    again = torch.zeros(n, n, device=DEV)
    cov_update_(again, X, mask, 1.0, splits=splits)
    assert torch.equal(S, again)


@pytest.mark.skipif(not lops.HAS_TRITON, reason="Triton is not installed")
def test_triton_strided_input():
    from lalora_kernels.triton.cov_update import cov_update_
    X = torch.randn(64, 200, device=DEV)[:, ::2]         # column stride 2
    S = spd(100).float().to(DEV)
    before = S.clone()
    cov_update_(S, X, None, 2.0)
    Xd = X.double().cpu()
    assert_close_like_torch(S, before.double().cpu() + 2.0 * Xd.T @ Xd, before.cpu() + 2.0 * X.cpu().T @ X.cpu())
