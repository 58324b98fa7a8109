"""lalora::diag_quad (v = 1/2 sum F D^2, dv/dD = F D): the reference is its kernel everywhere."""
import torch
from conftest import assert_close_like_torch

ops = torch.ops.lalora


def test_value_and_grad(backend):
    F = torch.rand(4, 7, dtype=torch.float64)
    D = torch.randn(4, 7, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        Dg = D.to(dtype).clone().requires_grad_()
        v, FD = ops.diag_quad(F.to(dtype), Dg)
        v.backward()
        assert_close_like_torch(v, 0.5 * (F * D ** 2).sum(), 0.5 * (F.to(dtype) * D.to(dtype) ** 2).sum())
        assert_close_like_torch(Dg.grad, F * D, F.to(dtype) * D.to(dtype))
        assert torch.equal(FD, Dg.grad)


def test_opcheck(backend):
    torch.library.opcheck(ops.diag_quad, (torch.rand(3, 4, 5, dtype=torch.float64),
                                          torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)))
