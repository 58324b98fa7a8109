"""SPEC section 4: the closed forms equal dense Kronecker quadratic forms and their autograd."""
import pytest
import torch
from dense import dense_kfac_blocks, dense_value
from problems import spd

from lalora_kernels.reference.closed_form import finalize, penalty_closed_form

SHAPES = [(5, 7, 3), (1, 9, 1), (13, 4, 2), (6, 6, 5)]   # (o, i, r)


def _case(o, i, r, zero_b=False):
    A0 = torch.randn(r, i, dtype=torch.float64)
    B0 = torch.zeros(o, r, dtype=torch.float64) if zero_b else torch.randn(o, r, dtype=torch.float64)
    A = A0 + 0.3 * torch.randn_like(A0)
    B = B0 + 0.3 * torch.randn_like(B0)
    return A, B, A0, B0, spd(i), spd(o)


@pytest.mark.parametrize("variant", ["kfac", "tri", "wkfac", "diag"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("zero_b", [False, True])
def test_closed_form_equals_dense(variant, shape, zero_b):
    o, i, r = shape
    A, B, A0, B0, Sx, Sg = _case(o, i, r, zero_b)
    s, lam, delta = 1.7, 0.9, 0.35
    FA, FB = torch.rand(r, i, dtype=torch.float64), torch.rand(o, r, dtype=torch.float64)
    fin = finalize(A0, B0, Sx, Sg)
    v, gA, gB = penalty_closed_form(variant, A, B, A0, B0, scaling=s, lam=lam, delta=delta, Sx=Sx,
                                    Sg=Sg, FA=FA, FB=FB, **fin)
    Ad, Bd = A.clone().requires_grad_(), B.clone().requires_grad_()
    ref = dense_value(variant, Ad, Bd, A0, B0, s, lam, delta, Sx=Sx, Sg=Sg, FA=FA, FB=FB)
    ref.backward()
    torch.testing.assert_close(v, ref.detach(), rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(gA, Ad.grad, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(gB, Bd.grad, rtol=1e-10, atol=1e-11)
    curv_only, _, _ = penalty_closed_form(variant, A, B, A0, B0, scaling=s, lam=lam, delta=0.0, Sx=Sx,
                                          Sg=Sg, FA=FA, FB=FB, **fin)
    assert curv_only >= 0 and v > curv_only             # F is PSD; the prior adds a positive term


@pytest.mark.parametrize("shape", SHAPES)
def test_tri_is_base_layer_kfac_of_first_order_change(shape):
    o, i, r = shape
    A, B, A0, B0, Sx, Sg = _case(o, i, r)
    s = 0.8
    v, _, _ = penalty_closed_form("tri", A, B, A0, B0, scaling=s, lam=1.0, Sx=Sx, Sg=Sg,
                                  **finalize(A0, B0, Sx, Sg))
    M = (B - B0) @ A0 + B0 @ (A - A0)
    torch.testing.assert_close(v, 0.5 * s**2 * torch.trace(M.T @ Sg @ M @ Sx), rtol=1e-11, atol=0)


@pytest.mark.parametrize("variant", ["kfac", "tri"])
def test_kronecker_curvature_is_psd(variant):
    o, i, r = 6, 5, 3
    _, _, A0, B0, Sx, Sg = _case(o, i, r)
    F = dense_kfac_blocks(variant, 1.3, A0, B0, Sx, Sg)
    assert torch.linalg.eigvalsh(F).min() > -1e-10 * F.abs().max()


def test_zero_factor_means_zero_block():
    o, i, r = 5, 7, 3
    A, B, A0, _, Sx, Sg = _case(o, i, r)
    B0 = torch.zeros(o, r, dtype=torch.float64)
    fin = finalize(A0, B0, Sx, Sg)
    full = penalty_closed_form("kfac", A, B, A0, B0, scaling=1.0, lam=1.0, Sx=Sx, Sg=Sg, **fin)
    fin.pop("Cbb")
    skipped = penalty_closed_form("kfac", A, B, A0, B0, scaling=1.0, lam=1.0, Sg=Sg, **fin)
    for a, b in zip(full, skipped):
        torch.testing.assert_close(a, b)


def test_unknown_variant():
    A, B, A0, B0, _, _ = _case(3, 3, 1)
    with pytest.raises(ValueError, match="variant='full' is unknown"):
        penalty_closed_form("full", A, B, A0, B0, scaling=1.0, lam=1.0)
