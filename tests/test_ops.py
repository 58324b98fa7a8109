"""lalora:: ops against float64 references: masks, odd sizes, dtypes, opcheck, torch.compile."""
import pytest
import torch
from conftest import TOL

import lalora_kernels  # noqa: F401
from lalora_kernels import LaLoRARegularizer, estimate_curvature

ops = torch.ops.lalora
IN_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _acc_dtype(dt):
    return torch.float64 if dt == torch.float64 else torch.float32


@pytest.mark.parametrize("n", [1, 7, 63, 129, 300, 520])
@pytest.mark.parametrize("dtype", IN_DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_cov_update_matches_float64(n, dtype, masked):
    N = 37
    X = torch.randn(N, n).to(dtype)
    mask = (torch.rand(N) > 0.4) if masked else None
    S0 = torch.randn(n, n, dtype=_acc_dtype(dtype))
    S0 = S0 + S0.T
    S = S0.clone()
    ops.cov_update_(S, X, mask, 0.75)
    Xd = X.double() if mask is None else X.double()[mask]
    ref = S0.double() + 0.75 * Xd.T @ Xd
    torch.testing.assert_close(S.double(), ref, **TOL[dtype if dtype != torch.float64 else torch.float64])
    assert torch.equal(S, S.T), "a symmetric accumulator must stay exactly symmetric"


def test_cov_update_handles_leading_dims_and_all_masked():
    X = torch.randn(2, 5, 9, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    S = torch.zeros(9, 9, dtype=torch.float64)
    ops.cov_update_(S, X, mask, 1.0)
    Xv = torch.stack([X[0, 0], X[0, 1], X[1, 0]])
    torch.testing.assert_close(S, Xv.T @ Xv)
    before = S.clone()
    ops.cov_update_(S, X, torch.zeros(2, 5), 1.0)
    assert torch.equal(S, before)


@pytest.mark.parametrize("dtype", IN_DTYPES)
def test_sqcov_update_matches_float64(dtype):
    N, p, q = 41, 5, 11
    G, X = torch.randn(N, p).to(dtype), torch.randn(N, q).to(dtype)
    mask = torch.rand(N) > 0.3
    F = torch.rand(p, q, dtype=_acc_dtype(dtype))
    F0 = F.clone()
    ops.sqcov_update_(F, G, X, mask, 2.0)
    ref = F0.double() + 2.0 * (G.double()[mask] ** 2).T @ (X.double()[mask] ** 2)
    torch.testing.assert_close(F.double(), ref, **TOL[dtype])


def gram_problem(classes, dtype=torch.float64, device="cpu"):
    """Random flat D and SPD arena for a GramLayout, with the op's table arguments."""
    from lalora_kernels.grouping import GramLayout
    layout = GramLayout(classes)
    items, work, pairs, plan = layout.tables()
    S = []
    for n, R, m in classes:
        X = torch.randn(m, n + 3, n, dtype=dtype)
        S.append((X.transpose(1, 2) @ X / n).reshape(-1))
    tabs = [torch.tensor(t, dtype=torch.int64, device=device).reshape(-1, len(t[0])) for t in (items, work, pairs)]
    D = torch.randn(layout.d_size, dtype=dtype, device=device)
    return D, torch.cat(S).to(device), tabs, plan, layout.flat_classes()


GRAM_CLASSES = [[(7, 1, 1)], [(64, 7, 3), (129, 24, 2)], [(5, 3, 2), (1, 2, 1), (256, 70, 1)]]


@pytest.mark.parametrize("classes", GRAM_CLASSES)
def test_grouped_gram_value_and_grad(classes):
    from lalora_kernels.reference import class_views
    D, arena, tabs, plan, flat = gram_problem(classes)
    D.requires_grad_()
    G, Q = ops.grouped_gram(D, arena, *tabs, plan, flat, 0)
    W = torch.randn_like(G)
    (G * W).sum().backward()
    ref = 0.0
    Dd = D.detach().clone().requires_grad_()
    for Dc, Sc, Gc, Qc, Wc in zip(class_views(Dd, flat, "D"), class_views(arena, flat, "S"),
                                  class_views(G.detach(), flat, "G"), class_views(Q, flat, "D"),
                                  class_views(W, flat, "G")):
        Gr = Dc @ Sc @ Dc.transpose(1, 2)
        torch.testing.assert_close(Gc, Gr.detach())
        torch.testing.assert_close(Qc, (Dc @ Sc).detach())
        ref = ref + (Gr * Wc).sum()
    ref.backward()
    torch.testing.assert_close(D.grad, Dd.grad)


def test_grouped_gram_bf16_rows_grads_in_input_dtype():
    D, arena, tabs, plan, flat = gram_problem([(6, 4, 2)], dtype=torch.float32)
    D = D.bfloat16().requires_grad_()
    G, _ = ops.grouped_gram(D, arena, *tabs, plan, flat, 0)
    assert G.dtype == torch.float32
    G.sum().backward()
    assert D.grad.dtype == torch.bfloat16


def test_opcheck_all_ops():
    S = torch.randn(9, 9)
    S = S @ S.T
    X, mask = torch.randn(3, 4, 9), torch.rand(3, 4) > 0.5
    torch.library.opcheck(ops.cov_update_, (S.clone(), X, mask, 0.5))
    torch.library.opcheck(ops.cov_update_, (S.clone(), X, None, 1.0))
    torch.library.opcheck(ops.sqcov_update_, (torch.rand(5, 9), torch.randn(3, 4, 5), X, mask, 1.5))
    D, arena, tabs, plan, flat = gram_problem([(9, 3, 2), (4, 5, 1)])
    torch.library.opcheck(ops.grouped_gram, (D.requires_grad_(), arena, *tabs, plan, flat, 0))
    torch.library.opcheck(ops.grouped_gram, (D, arena.bfloat16(), *tabs, plan, flat, 0))   # bf16 factors
    g = 9 * 2 + 25
    C = torch.randn(g)
    for tile in (0, 8):
        if tile:
            from lalora_kernels.reference import class_views, pack
            arena = torch.cat([pack(S, 8) for Sc in class_views(arena, flat, "S") for S in Sc])
        for grad in (True, False):
            torch.library.opcheck(ops.grouped_gram_quad, (D if grad else D.detach(), arena, *tabs, plan, flat, tile, C, grad))
    from lalora_kernels.reference import pack
    for tile in (8, 16):
        torch.library.opcheck(ops.packed_cov_update_, (pack(S, tile), X, mask, 0.5, tile))
    torch.library.opcheck(ops.diag_quad, (torch.rand(3, 4, 5, dtype=torch.float64),
                                          torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)))


def test_diag_quad_value_and_grad():
    F = torch.rand(4, 7, dtype=torch.float64)
    D = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    v, FD = ops.diag_quad(F, D)
    v.backward()
    torch.testing.assert_close(v, 0.5 * (F * D.detach() ** 2).sum())
    torch.testing.assert_close(D.grad, F * D.detach())
    torch.testing.assert_close(FD, F * D.detach())


@pytest.mark.parametrize("variant", ["tri", "wkfac"])
@pytest.mark.inductor
def test_compile_fullgraph_task_loss_plus_penalty(variant):
    from models import batches, tiny_llama
    model = tiny_llama(torch.float32, layers=1, targets=["q_proj", "v_proj", "down_proj"])
    model.eval()
    data = batches(n=1)
    curv = estimate_curvature(model, data, variant=variant, progress=False)
    reg = LaLoRARegularizer(curv, lam=3.0, prior_precision=0.1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * torch.randn_like(p))

    def step(m, batch):
        return m(**batch).loss + reg(m)

    def grads():
        return [p.grad.clone() for n, p in model.named_parameters() if "lora_" in n]

    compiled = torch.compile(step, fullgraph=True)(model, data[0])   # first call binds the model
    compiled.backward()
    g_compiled = grads()
    model.zero_grad()
    eager = step(model, data[0])
    eager.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_compiled, grads()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
