"""Triton kernels against the float64 reference (TRITON_INTERPRET=1 on CPU, real kernels on GPU)."""
import warnings

import pytest
import torch
from conftest import TOL, rel_err

from lalora_kernels.reference import pack, packed_numel, unpack
from lalora_kernels.triton import accumulate, diag, gram, packed

DEV = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-5, atol=1e-5),
              torch.float16: dict(rtol=1e-5, atol=1e-5)}


def _ref_cov(S0, X, mask, w):
    Xd = X.double()
    if mask is not None:
        Xd = Xd * (mask.double()[:, None] != 0)
    return S0.double() + w * Xd.T @ Xd


@pytest.mark.parametrize("n", [1, 7, 64, 129, 256])
@pytest.mark.parametrize("N", [1, 63, 2048])
def test_cov_update_shapes(n, N):
    X = torch.randn(N, n, device=DEV)
    mask = torch.rand(N, device=DEV) > 0.3
    S0 = torch.randn(n, n, device=DEV)
    S0 = S0 + S0.T
    S = S0.clone()
    accumulate.cov_update_(S, X, mask, 0.5)
    # inputs are exact in fp32, so the only error is fp32 accumulation order
    torch.testing.assert_close(S.double(), _ref_cov(S0, X, mask, 0.5), rtol=1e-5, atol=1e-4)
    assert torch.equal(S, S.T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("splits", [1, 3, None])
def test_cov_update_dtypes_and_splits(dtype, splits):
    N, n = 700, 129
    X = torch.randn(N, n, device=DEV).to(dtype)
    mask = torch.ones(N, dtype=torch.long, device=DEV)
    mask[500:] = 0
    S = torch.zeros(n, n, device=DEV)
    accumulate.cov_update_(S, X, mask, 1.0, splits=splits)
    ref = _ref_cov(torch.zeros(n, n), X.cpu(), mask.cpu(), 1.0)
    # the kernel sees the same rounded inputs as the reference: only accumulation error remains
    torch.testing.assert_close(S.double().cpu(), ref, **KERNEL_TOL[dtype], msg=lambda m: m)
    again = torch.zeros(n, n, device=DEV)
    accumulate.cov_update_(again, X, mask, 1.0, splits=splits)
    assert torch.equal(S, again), "the reduction must be deterministic"


def test_cov_update_all_masked_and_strided_input():
    X = torch.randn(64, 200, device=DEV)[:, ::2]         # column stride 2
    S = torch.randn(100, 100, device=DEV)
    S = S + S.T
    before = S.clone()
    accumulate.cov_update_(S, X, torch.zeros(64, device=DEV), 1.0)
    assert torch.equal(S, before)
    accumulate.cov_update_(S, X, None, 2.0)
    torch.testing.assert_close(S.double().cpu(), _ref_cov(before.cpu(), X.cpu(), None, 2.0),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("p,q", [(1, 7), (8, 129), (64, 256), (129, 3)])
@pytest.mark.parametrize("N", [63, 2048])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sqcov_update(p, q, N, dtype):
    G, X = torch.randn(N, p, device=DEV).to(dtype), torch.randn(N, q, device=DEV).to(dtype)
    mask = torch.rand(N, device=DEV) > 0.25
    F = torch.rand(p, q, device=DEV)
    F0 = F.clone()
    diag.sqcov_update_(F, G, X, mask, 0.3)
    m = mask.double().cpu()[:, None]
    ref = F0.double().cpu() + 0.3 * ((G.double().cpu() ** 2) * m).T @ (X.double().cpu() ** 2)
    torch.testing.assert_close(F.double().cpu(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("classes", [[(7, 1, 1)], [(64, 7, 3), (129, 24, 2)],
                                     [(5, 3, 2), (1, 2, 1), (256, 70, 1), (100, 40, 2)]])
def test_grouped_gram(classes):
    from test_ops import gram_problem

    from lalora_kernels.reference import grouped_gram as ref_gram
    D, arena, tabs, plan, flat = gram_problem(classes, dtype=torch.float32, device=DEV)
    g_size = sum(flat[c + 1] ** 2 * flat[c + 2] for c in range(0, len(flat), 6))
    G, Q = gram.grouped_gram(D, arena, *tabs, plan, g_size)
    Gr, Qr = ref_gram(D.double().cpu(), arena.double().cpu(), flat)
    assert rel_err(Q.cpu(), Qr) < 1e-6
    assert rel_err(G.cpu(), Gr) < 1e-6
    G2, _ = gram.grouped_gram(D, arena, *tabs, plan, g_size)
    assert torch.equal(G, G2), "the reduction must be deterministic"


def test_ops_dispatch_to_triton_and_grouped_penalty(monkeypatch):
    """The whole penalty through the op layer on the Triton backend equals the torch backend."""
    from test_penalty import _closed_sum, _fused, _problem
    for variant in ("kfac", "tri", "wkfac"):
        p = _problem(torch.float32)
        on = lambda ts: [t.detach().float().to(DEV) for t in ts]  # noqa: E731
        A, B = [a.requires_grad_() for a in on(p["A"])], [b.requires_grad_() for b in on(p["B"])]
        pd = dict(p, A=A, B=B, A0=on(p["A0"]), B0=on(p["B0"]), Sx=on(p["Sx"]), Sg=on(p["Sg"]))
        monkeypatch.setenv("LALORA_BACKEND", "triton")
        value = _fused(variant, pd, 1.1, 0.1)
        value.backward()
        monkeypatch.delenv("LALORA_BACKEND")
        ref, gA, gB = _closed_sum(variant, p, 1.1, 0.1)
        torch.testing.assert_close(value.double().cpu(), ref, **TOL[torch.float32])
        for k in range(len(gA)):
            torch.testing.assert_close(A[k].grad.double().cpu(), gA[k], **TOL[torch.float32])
            torch.testing.assert_close(B[k].grad.double().cpu(), gB[k], **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_capture_on_triton_backend_matches_torch(monkeypatch, dtype):
    from models import batches, tiny_llama
    from lalora_kernels import estimate_curvature
    data = batches()
    out = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("LALORA_BACKEND", backend)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[backend] = {v: estimate_curvature(tiny_llama(dtype).to(DEV), data, variant=v,
                                                  progress=False) for v in ("tri", "diag")}
    for v, curv in out["triton"].items():
        assert curv.layout == "packed"          # Triton runs packed kernels, so packed is the default
        for k, t in out["torch"][v].tensors.items():
            torch.testing.assert_close(curv.dense(k), t, rtol=1e-5, atol=1e-6)


# ---- tile-packed kernels -------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7, 64, 129, 256])
@pytest.mark.parametrize("N", [1, 63, 2048])
def test_packed_cov_update_shapes(n, N):
    X = torch.randn(N, n, device=DEV)
    mask = torch.rand(N, device=DEV) > 0.3
    S0 = torch.randn(n, n)
    S0 = S0 + S0.T
    P = pack(S0, 32).to(DEV)
    packed.packed_cov_update_(P, X, mask, 0.5, 32)
    got = unpack(P.cpu(), n, 32)
    torch.testing.assert_close(got.double(), _ref_cov(S0, X.cpu(), mask.cpu(), 0.5), rtol=1e-5, atol=1e-4)
    assert torch.equal(got, got.T)
    assert torch.equal(pack(got, 32), P.cpu()), "padding beyond n must stay zero"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("splits", [1, 3, None])
@pytest.mark.parametrize("tile", [16, 32, 64])
def test_packed_cov_update_dtypes_splits_tiles(dtype, splits, tile):
    N, n = 700, 129
    X = torch.randn(N, n, device=DEV).to(dtype)
    mask = torch.ones(N, dtype=torch.long, device=DEV)
    mask[500:] = 0
    P = torch.zeros(packed_numel(n, tile), device=DEV)
    packed.packed_cov_update_(P, X, mask, 1.0, tile, splits=splits)
    ref = _ref_cov(torch.zeros(n, n), X.cpu(), mask.cpu(), 1.0)
    torch.testing.assert_close(unpack(P.cpu(), n, tile).double(), ref, **KERNEL_TOL[dtype])
    again = torch.zeros_like(P)
    packed.packed_cov_update_(again, X, mask, 1.0, tile, splits=splits)
    assert torch.equal(P, again), "the reduction must be deterministic"


def test_packed_kernels_reject_small_tiles():
    with pytest.raises(ValueError, match="tile >= 16"):
        packed.packed_cov_update_(torch.zeros(packed_numel(9, 8)), torch.randn(3, 9), None, 1.0, 8)


@pytest.mark.parametrize("classes", [[(7, 1, 1)], [(64, 7, 3), (129, 24, 2)],
                                     [(5, 3, 2), (1, 2, 1), (256, 70, 1), (100, 40, 2)]])
def test_packed_grouped_gram(classes):
    from test_packed import _packed_problem

    from lalora_kernels.reference import grouped_gram as ref_gram
    (D, arena, _, _, flat), (P, tabs, plan, pflat) = _packed_problem(classes, 32, torch.float32)
    g_size = sum(flat[c + 1] ** 2 * flat[c + 2] for c in range(0, len(flat), 6))
    D, P, tabs = D.to(DEV), P.to(DEV), [t.to(DEV) for t in tabs]
    G, Q = packed.packed_gram(D, P, *tabs, plan, g_size, 32)
    Gr, Qr = ref_gram(D.double().cpu(), arena.double(), flat)
    assert rel_err(Q.cpu(), Qr) < 1e-6
    assert rel_err(G.cpu(), Gr) < 1e-6
    G2, Q2 = packed.packed_gram(D, P, *tabs, plan, g_size, 32)
    assert torch.equal(G, G2) and torch.equal(Q, Q2), "the reduction must be deterministic"


@pytest.mark.parametrize("tile", [0, 32])
def test_grouped_gram_quad_on_triton_backend(monkeypatch, tile):
    """The penalty op (products + epilogue) on Triton, dense and packed, vs the float64 oracle."""
    from test_packed import _packed_problem, quad_oracle, quad_problem
    classes = [(64, 7, 3), (129, 24, 2), (5, 3, 1)]
    (D, arena, tabs, plan, flat), (P, ptabs, pplan, pflat) = _packed_problem(classes, 32, torch.float32)
    C = quad_problem(classes, torch.float32)
    v_ref, g_ref = quad_oracle(D, arena, flat, C)
    args = (arena, tabs, plan, flat) if tile == 0 else (P, ptabs, pplan, pflat)
    monkeypatch.setenv("LALORA_BACKEND", "triton")
    from lalora_kernels.triton import quad
    calls, launcher = [], quad.grouped_gram_quad
    monkeypatch.setattr(quad, "grouped_gram_quad", lambda *a: calls.append(a[7]) or launcher(*a))
    Dg = D.to(DEV).requires_grad_()
    v, dD = torch.ops.lalora.grouped_gram_quad(Dg, args[0].to(DEV), *[t.to(DEV) for t in args[1]], args[2],
                                               args[3], tile, C.to(DEV), True)
    v.backward()
    assert rel_err(v.detach().cpu(), v_ref) < 1e-5
    assert rel_err(dD.cpu(), g_ref) < 1e-5 and torch.equal(Dg.grad, dD)
    assert calls == [tile], "the op must run the fused Triton launcher"


@pytest.mark.parametrize("tile", [0, 32])
@pytest.mark.parametrize("classes", [[(64, 7, 3), (129, 24, 2), (5, 3, 1), (70, 40, 1), (33, 17, 1)],
                                     [(40, 70, 1), (33, 9, 2), (100, 64, 1), (20, 130, 1), (12, 1, 2)]])
@pytest.mark.parametrize("arena_dtype", [torch.float32, torch.bfloat16])
def test_fused_quad_kernel(tile, classes, arena_dtype):
    """grouped_gram_quad's Triton launcher: the epilogue fused into the product kernels for items of
    one row tile (R <= 64), the two-pass path for R = 70 and 130 (several row tiles) in the same
    bucket as fused R = 64 items; value and gradient vs the float64 oracle, grad=False, same bits."""
    from test_packed import _packed_problem, quad_oracle, quad_problem

    from lalora_kernels.triton import quad
    (D, arena, tabs, plan, flat), (P, ptabs, pplan, pflat) = _packed_problem(classes, 32, torch.float32)
    arena = arena.to(arena_dtype).float()                  # the oracle sees the factors as stored
    P = P.to(arena_dtype).float()                          # packing commutes with rounding
    C = quad_problem(classes, torch.float32, seed=3)
    v_ref, g_ref = quad_oracle(D, arena, flat, C)
    S, t, pl, fl = (arena, tabs, plan, flat) if tile == 0 else (P, ptabs, pplan, pflat)
    call = lambda grad: quad.grouped_gram_quad(D.to(DEV), S.to(arena_dtype).to(DEV),  # noqa: E731
                                               *[x.to(DEV) for x in t], pl, fl, tile, C.to(DEV), grad)
    v, dD = call(True)
    assert v.shape == () and dD.shape == D.shape
    assert rel_err(v.cpu(), v_ref) < 1e-5
    assert rel_err(dD.cpu(), g_ref) < 1e-5
    v2, dD2 = call(True)
    assert torch.equal(v, v2) and torch.equal(dD, dD2), "fused penalty must be deterministic"
    if arena_dtype == torch.float32:        # grad=False once per layout (each variant is a GPU compile)
        v3, none = call(False)
        assert none.numel() == 0 and torch.equal(v3, v)
    with pytest.raises(ValueError, match="C has"):
        quad.grouped_gram_quad(D.to(DEV), S.to(DEV), *[x.to(DEV) for x in t], pl, fl, tile, C[1:].to(DEV), True)
    v0, d0 = quad.grouped_gram_quad(D[:0].to(DEV), S[:0].to(DEV), *[x[:0].to(DEV) for x in t], [], [], tile,
                                    C[:0].to(DEV), True)
    assert float(v0) == 0.0 and d0.numel() == 0


@pytest.mark.parametrize("variant", ["kfac", "tri", "wkfac"])
def test_packed_penalty_on_triton_backend(monkeypatch, variant):
    """LaplacePenalty on tile-packed factors through the op layer on Triton vs the closed form."""
    from test_penalty import LAYOUT, _closed_sum, _problem

    from lalora_kernels import LaplacePenalty, LoRACurvature
    p = _problem(torch.float32, zero_b=() if variant == "wkfac" else (2,))
    on = lambda ts: [t.detach().float().to(DEV) for t in ts]  # noqa: E731
    A, B = [a.requires_grad_() for a in on(p["A"])], [b.requires_grad_() for b in on(p["B"])]
    curv = LoRACurvature.from_tensors(on(p["A0"]), on(p["B0"]), variant=variant, scaling=p["scaling"],
                                      Sx=on(p["Sx"]), sx_index=[j for *_, j in LAYOUT], Sg=on(p["Sg"]))
    curv.to_layout("packed", 16)
    monkeypatch.setenv("LALORA_BACKEND", "triton")
    value = LaplacePenalty(curv, lam=1.1, prior_precision=0.1, normalize=None)(A, B)
    value.backward()
    ref, gA, gB = _closed_sum(variant, p, 1.1, 0.1)
    torch.testing.assert_close(value.double().cpu(), ref, **TOL[torch.float32])
    for k in range(len(gA)):
        torch.testing.assert_close(A[k].grad.double().cpu(), gA[k], **TOL[torch.float32])
        torch.testing.assert_close(B[k].grad.double().cpu(), gB[k], **TOL[torch.float32])


@pytest.mark.parametrize("layout", ["dense", "packed"])
def test_bf16_factors_on_triton_backend(monkeypatch, layout):
    """bf16 arena (dense and tile-packed) on Triton: bf16 loads widened to fp32 in the kernels."""
    from test_packed import bf16_case
    monkeypatch.setenv("LALORA_BACKEND", "triton")
    pen, v, grads, ref, ref_grads, exact = bf16_case("wkfac", layout, tile=16, device=DEV)
    assert pen.arena.dtype == torch.bfloat16 and v.dtype == torch.float32
    assert rel_err(v.detach().cpu(), ref.cpu()) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert rel_err(g.cpu(), r.cpu()) < 1e-4
