"""lalora::grouped_gram (Q_k = D_k S_k, G_k = Q_k D_k^T for every bundle of a class table) on every
backend, dense and tile-packed factors, against float64."""
import pytest
import torch
from conftest import DEV, assert_close_like_torch, available_backends
from problems import gram_oracle, gram_problem

from lalora_kernels.reference.packed_format import unpack

ops = torch.ops.lalora
# mixed shapes: n = 1, n < tile, R = 70 (two Triton row tiles), several bundles per class
SHAPES = [(7, 3, 2), (33, 9, 1), (129, 20, 2), (40, 70, 1), (1, 2, 1)]
TILES = [0, 16, 32]
ARENAS = [torch.float64, torch.float32, torch.bfloat16]


def _stored(g, tile, arena_dtype):
    """The arena as stored in ``arena_dtype``, and the dense float64 factors it holds (rounded)."""
    arena, classes = g.arena(tile)
    arena = arena.to(arena_dtype)
    dense = g.dense.to(arena_dtype).double()            # packing commutes with rounding
    return arena, classes, dense


def _baseline(g, dense, dtype, W):
    """PyTorch's own G, Q and gradient in ``dtype`` (float32 for bf16 factors)."""
    dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    D = g.D.to(dtype).requires_grad_()
    from lalora_kernels.reference.grouped_gram import class_views
    Gs, Qs = [], []
    for Dc, Sc in zip(class_views(D, g.classes, "D"), class_views(dense.to(dtype), g.classes, "S")):
        Q = Dc @ Sc
        Qs.append(Q.reshape(-1))
        Gs.append((Q @ Dc.transpose(1, 2)).reshape(-1))
    G, Q = torch.cat(Gs), torch.cat(Qs)
    (grad,) = torch.autograd.grad((G * W.to(dtype)).sum(), D)
    return G.detach(), Q.detach(), grad


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("arena_dtype", ARENAS)
def test_matches_float64(backend, tile, arena_dtype):
    g = gram_problem(SHAPES, tile=tile or 32)
    arena, classes, dense = _stored(g, tile, arena_dtype)
    d_dtype = torch.float64 if arena_dtype == torch.float64 else torch.float32
    W = torch.randn(sum(R * R * m for n, R, m in SHAPES), dtype=torch.float64)
    D = g.D.to(DEV, d_dtype).requires_grad_()
    G, Q = ops.grouped_gram(D, arena.to(DEV), classes, tile)
    (G * W.to(DEV, G.dtype)).sum().backward()
    G_ref, Q_ref = gram_oracle(g.D, dense, g.classes)
    _, grad_ref = gram_oracle(g.D, dense, g.classes, 2 * W)      # d<W, G>/dD = d(1/2 <2W, G>)/dD
    G_b, Q_b, grad_b = _baseline(g, dense, arena_dtype if arena_dtype != torch.float64 else d_dtype, W)
    assert_close_like_torch(G, G_ref, G_b)
    assert_close_like_torch(Q, Q_ref, Q_b)
    assert_close_like_torch(D.grad, grad_ref, grad_b)
    G2, Q2 = ops.grouped_gram(D.detach(), arena.to(DEV), classes, tile)
    assert torch.equal(G, G2) and torch.equal(Q, Q2), "the same bits every call"


def test_rows_grads_in_input_dtype(backend):
    g = gram_problem([(6, 4, 2)], tile=16, dtype=torch.float32)
    D = g.D.bfloat16().requires_grad_()
    G, _ = ops.grouped_gram(D.to(DEV), g.dense.to(DEV), g.classes, 0)
    assert G.dtype == torch.float32
    G.sum().backward()
    assert D.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("cpu_backend", [b for b in available_backends() if b != "triton"])
def test_large_factors_take_the_cpu_kernel_s_other_paths(cpu_backend, monkeypatch):
    """(600, 4, 1) is split over several tasks on the C++ path; (700, 52, 1) has rows left over from
    blocks of 8 and, in float64, partials too big for the storage-order pass (it goes by column
    blocks). Large for the Triton interpreter, whose launch the shapes above cover."""
    monkeypatch.setenv("LALORA_BACKEND", cpu_backend)
    shapes = [(600, 4, 1), (700, 52, 1)]
    g = gram_problem(shapes, tile=32)
    for dtype in (torch.float64, torch.float32):
        G, Q = ops.grouped_gram(g.D.to(dtype), g.packed.to(dtype), g.packed_classes, 32)
        G_ref, Q_ref = gram_oracle(g.D, g.dense, g.classes)
        G_b, Q_b, _ = _baseline(g, g.dense, dtype, torch.zeros(G_ref.numel(), dtype=torch.float64))
        assert_close_like_torch(G, G_ref, G_b)
        assert_close_like_torch(Q, Q_ref, Q_b)


def test_gradcheck(backend):
    g = gram_problem([(9, 3, 2), (17, 5, 1)], tile=16)
    D = g.D.clone().requires_grad_()
    W = torch.randn(sum(R * R * m for n, R, m in g.shapes), dtype=torch.float64)
    for tile in (0, 16):
        arena, classes = g.arena(tile)
        assert torch.autograd.gradcheck(lambda d: (ops.grouped_gram(d, arena, classes, tile)[0] * W).sum(), (D,))


def test_opcheck(backend):
    g = gram_problem([(9, 3, 2), (4, 5, 1)], tile=16, dtype=torch.float32)
    for tile in (0, 16):
        arena, classes = g.arena(tile)
        torch.library.opcheck(ops.grouped_gram, (g.D.clone().requires_grad_(), arena, classes, tile))
        torch.library.opcheck(ops.grouped_gram, (g.D, arena.bfloat16(), classes, tile))


def test_packed_arena_is_the_dense_one_packed():
    g = gram_problem([(40, 3, 2)], tile=16)
    from lalora_kernels.reference.grouped_gram import class_views
    for dense_S, packed_S in zip(class_views(g.dense, g.classes, "S"), class_views(g.packed, g.packed_classes, "S", 16)):
        for S, P in zip(dense_S, packed_S):
            assert torch.equal(unpack(P.reshape(-1), 40, 16), S)
