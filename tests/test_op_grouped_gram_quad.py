"""lalora::grouped_gram_quad (the kfac/tri penalty: v = 1/2 <C, G>, dD = (W + W^T) Q) on every
backend, dense and tile-packed factors, against float64; the fused Triton epilogue on items of one
row tile and the two-pass path on wider ones, in the same bucket."""
import pytest
import torch
from conftest import DEV, assert_close_like_torch
from problems import gram_oracle, gram_problem, quad_weights

from lalora_kernels import ops as lops

ops = torch.ops.lalora
SHAPES = [(64, 7, 3), (129, 24, 2), (5, 3, 1), (70, 40, 1), (33, 17, 1), (40, 70, 1), (20, 130, 1), (12, 1, 2)]


@pytest.mark.parametrize("tile", [0, 32])
@pytest.mark.parametrize("arena_dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_matches_float64(backend, tile, arena_dtype):
    g = gram_problem(SHAPES, tile=32)
    arena, classes = g.arena(tile)
    dense = g.dense.to(arena_dtype).double()                     # the factors as stored
    dtype = torch.float64 if arena_dtype == torch.float64 else torch.float32
    C = quad_weights(SHAPES, seed=3)
    v_ref, g_ref = gram_oracle(g.D, dense, g.classes, C)
    v_b, g_b = gram_oracle(g.D, dense, g.classes, C, dtype=dtype)
    D = g.D.to(DEV, dtype).requires_grad_()
    v, dD = ops.grouped_gram_quad(D, arena.to(arena_dtype).to(DEV), classes, tile, C.to(DEV, dtype), True)
    (grad,) = torch.autograd.grad(3.0 * v, D)
    G_ref, _ = gram_oracle(g.D, dense, g.classes)
    assert_close_like_torch(v, v_ref, v_b, scale=float(0.5 * (C.abs() * G_ref.abs()).sum()))
    assert_close_like_torch(dD, g_ref, g_b)
    assert_close_like_torch(grad, 3.0 * g_ref, 3.0 * g_b)
    v2, dD2 = ops.grouped_gram_quad(D.detach(), arena.to(arena_dtype).to(DEV), classes, tile, C.to(DEV, dtype), True)
    assert torch.equal(v, v2) and torch.equal(dD, dD2), "the same bits every call"
    v3, none = ops.grouped_gram_quad(D.detach(), arena.to(arena_dtype).to(DEV), classes, tile, C.to(DEV, dtype), False)
    assert none.numel() == 0 and torch.equal(v3, v)


def test_without_grad_cannot_backprop(backend):
    g = gram_problem([(9, 3, 2)], tile=16)
    D = g.D.clone().requires_grad_()
    v, _ = ops.grouped_gram_quad(D, g.packed, g.packed_classes, 16, quad_weights(g.shapes), False)
    with pytest.raises(RuntimeError, match="grad=False"):
        v.backward()


def test_rejects_bad_weights(backend):
    g = gram_problem([(9, 3, 2)], tile=16)
    with pytest.raises(ValueError, match="C has shape \\(5,\\); it must be 1-D with 18 numbers"):
        ops.grouped_gram_quad(g.D, g.packed, g.packed_classes, 16, quad_weights(g.shapes)[:5], True)


def test_no_classes_give_zero(backend):
    D, arena = torch.zeros(0), torch.zeros(0)
    v, dD = ops.grouped_gram_quad(D.to(DEV), arena.to(DEV), [], 32, torch.zeros(0, device=DEV), True)
    assert float(v) == 0.0 and dD.numel() == 0


def test_opcheck(backend):
    g = gram_problem([(9, 3, 2), (4, 5, 1)], tile=16, dtype=torch.float32)
    C = quad_weights(g.shapes, torch.float32)
    for tile in (0, 16):
        arena, classes = g.arena(tile)
        for grad in (True, False):
            D = g.D.clone().requires_grad_() if grad else g.D
            torch.library.opcheck(ops.grouped_gram_quad, (D, arena, classes, tile, C, grad))


@pytest.mark.skipif(not lops.HAS_TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("tile", [0, 32])
def test_triton_backend_runs_the_fused_launcher(monkeypatch, tile):
    from lalora_kernels.triton import grouped_gram_quad as quad
    calls, launcher = [], quad.grouped_gram_quad
    monkeypatch.setattr(quad, "grouped_gram_quad", lambda *a: calls.append(a[3]) or launcher(*a))
    monkeypatch.setenv("LALORA_BACKEND", "triton")
    g = gram_problem([(64, 7, 3), (5, 3, 1)], tile=32, dtype=torch.float32)
    arena, classes = g.arena(tile)
    ops.grouped_gram_quad(g.D.to(DEV), arena.to(DEV), classes, tile, quad_weights(g.shapes, torch.float32).to(DEV),
                          True)
    assert calls == [tile]
