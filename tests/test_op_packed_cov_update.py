"""lalora::packed_cov_update_ (S += w X^T diag(m) X on a tile-packed S) on every backend."""
import pytest
import torch
from conftest import DEV, assert_close_like_torch
from problems import spd

from lalora_kernels import ops as lops
from lalora_kernels.reference.packed_format import pack, packed_numel, unpack

ops = torch.ops.lalora


def _tiles_for(backend):
    return [16, 32] if backend == "triton" else [8, 16, 32]      # Triton's tl.dot blocks need T >= 16


@pytest.mark.parametrize("n", [1, 7, 33, 129, 300])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_float64(backend, n, dtype, masked):
    N = 45
    X = torch.randn(3, N // 3, n).to(dtype)
    mask = (torch.rand(3, N // 3) > 0.4) if masked else None
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    S0 = spd(n)
    Xd = X.double().reshape(-1, n) if mask is None else X.double()[mask]
    Xa = X.to(acc).reshape(-1, n) if mask is None else X.to(acc)[mask]
    ref, baseline = S0 + 0.75 * Xd.T @ Xd, S0.to(acc) + 0.75 * Xa.T @ Xa
    for tile in _tiles_for(backend):
        P = pack(S0.to(acc), tile).to(DEV)
        ops.packed_cov_update_(P, X.to(DEV), None if mask is None else mask.to(DEV), 0.75, tile)
        got = unpack(P.cpu(), n, tile)
        assert_close_like_torch(got, ref, baseline)
        assert torch.equal(got, got.T), "diagonal tiles stay exactly symmetric"
        assert torch.equal(pack(got, tile), P.cpu()), "padding beyond n stays zero"


def test_all_masked_and_empty(backend):
    P = pack(spd(9).float(), 16)
    before = P.clone()
    ops.packed_cov_update_(P, torch.randn(2, 5, 9), torch.zeros(2, 5), 1.0, 16)
    ops.packed_cov_update_(P, torch.randn(0, 9), None, 1.0, 16)
    assert torch.equal(P, before)


def test_rejects_wrong_size(backend):
    with pytest.raises(ValueError, match="packed factor of n=9, tile=8 is a contiguous 1-D tensor of 192 numbers"):
        ops.packed_cov_update_(torch.zeros(100), torch.randn(4, 9), None, 1.0, 8)


def test_opcheck(backend):
    S = spd(9).float()
    X, mask = torch.randn(3, 4, 9), torch.rand(3, 4) > 0.5
    for tile in _tiles_for(backend):
        torch.library.opcheck(ops.packed_cov_update_, (pack(S, tile), X, mask, 0.5, tile))


@pytest.mark.skipif(not lops.HAS_TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("splits", [1, 3, None])
@pytest.mark.parametrize("tile", [16, 32, 64])
def test_triton_token_splits_are_deterministic(dtype, splits, tile):
    from lalora_kernels.triton.packed_cov_update import packed_cov_update_
    N, n = 700, 129
    X = torch.randn(N, n, device=DEV).to(dtype)
    mask = torch.ones(N, dtype=torch.long, device=DEV)
    mask[500:] = 0
    P = torch.zeros(packed_numel(n, tile), device=DEV)
    packed_cov_update_(P, X, mask, 1.0, tile, splits=splits)
    Xd, Xf = X.double().cpu()[:500], X.float().cpu()[:500]
    assert_close_like_torch(unpack(P.cpu(), n, tile), Xd.T @ Xd, Xf.T @ Xf)
    again = torch.zeros_like(P)
    packed_cov_update_(again, X, mask, 1.0, tile, splits=splits)
    assert torch.equal(P, again)


@pytest.mark.skipif(not lops.HAS_TRITON, reason="Triton is not installed")
def test_triton_rejects_small_tiles(monkeypatch):
    monkeypatch.setenv("LALORA_BACKEND", "triton")
    with pytest.raises(ValueError, match="tile >= 16"):
        ops.packed_cov_update_(torch.zeros(packed_numel(9, 8)), torch.randn(3, 9), None, 1.0, 8)
