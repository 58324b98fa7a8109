"""lalora::sqcov_update_ (F += w (G*G)^T diag(m) (X*X), the diag curvature) on every backend."""
import pytest
import torch
from conftest import DEV, assert_close_like_torch

ops = torch.ops.lalora


@pytest.mark.parametrize("p,q", [(1, 7), (8, 129), (64, 256), (129, 3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_matches_float64(backend, p, q, dtype):
    N = 63
    G, X = torch.randn(N, p).to(dtype), torch.randn(N, q).to(dtype)
    mask = torch.rand(N) > 0.3
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    F0 = torch.rand(p, q, dtype=acc)
    F = F0.clone().to(DEV)
    ops.sqcov_update_(F, G.to(DEV), X.to(DEV), mask.to(DEV), 2.0)
    ref = F0.double() + 2.0 * (G.double()[mask] ** 2).T @ (X.double()[mask] ** 2)
    baseline = F0 + 2.0 * (G.to(acc)[mask] ** 2).T @ (X.to(acc)[mask] ** 2)
    assert_close_like_torch(F, ref, baseline)


def test_opcheck(backend):
    X, mask = torch.randn(3, 4, 9), torch.rand(3, 4) > 0.5
    torch.library.opcheck(ops.sqcov_update_, (torch.rand(5, 9), torch.randn(3, 4, 5), X, mask, 1.5))
