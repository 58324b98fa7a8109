"""Tile-packed storage (docs/SPEC.md, "Storage formats") on the reference and C++ backends: the
format itself, the packed ops against the float64 dense oracle, the penalty and curvature on packed
factors against dense ones, determinism of the C++ kernels, and the fallback when ``_C`` is absent.
(The Triton packed kernels are tested in test_triton_kernels.py.)"""
import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import TOL
from dense import spd
from models import batches, tiny_llama
from test_ops import gram_problem
from test_penalty import LAYOUT, _problem

import lalora_kernels
from lalora_kernels import LaplacePenalty, LoRACurvature, estimate_curvature
from lalora_kernels import _cpp, ops as lops
from lalora_kernels.reference import (TILE, pack, packed_cov_update_, packed_numel, packed_trace,
                                      unpack)
from lalora_kernels.reference.covariance import cov_update_ as dense_cov_update_

ops = torch.ops.lalora
# Both CPU paths are always tested: the C++ kernels are part of the package (make setup builds them).
BACKENDS = ["torch", "cpp"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("LALORA_BACKEND", request.param)
    return request.param


@pytest.fixture
def cpp_ops():
    """``torch.ops.lalora_cpp``, with ``_C`` loaded (a test run alone must not depend on an
    earlier test having imported it)."""
    assert _cpp.available(), f"lalora_kernels._C failed to load: {_cpp.load()}"
    return torch.ops.lalora_cpp


def test_cpp_extension_is_built():
    assert _cpp.available(), f"lalora_kernels._C failed to load: {_cpp.load()}"
    info = lalora_kernels.backends()
    assert info["cpp"]["available"] and info["cpu"] == "cpp" and info["default_storage"]["cpu"] == "packed"


# ---- the format --------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7, 31, 32, 33, 129])
@pytest.mark.parametrize("tile", [1, 8, 16, 32, 64])
def test_pack_unpack_round_trip_is_exact(n, tile):
    S = spd(n)
    P = pack(S, tile)
    nt = -(-n // tile)
    assert P.shape == (nt * (nt + 1) // 2 * tile * tile,) == (packed_numel(n, tile),)
    assert torch.equal(unpack(P, n, tile), S)
    assert torch.equal(pack(unpack(P, n, tile), tile), P)
    assert float(packed_trace(P, n, tile)) == pytest.approx(float(S.trace()), rel=1e-14)
    # layout: tile (I, J) at row-major upper-triangle index, element (a, b) row-major in it
    last = nt * (nt + 1) // 2 - 1                       # tile (nt-1, nt-1)
    a = (n - 1) % tile
    assert P[last * tile * tile + a * tile + a] == S[n - 1, n - 1]
    if n > tile + 1:                                   # tile (0, 1), element (0, 1)
        assert P[tile * tile + 1] == S[0, tile + 1]


@pytest.mark.parametrize("tile", [1, 8, 32])
def test_pack_reads_the_upper_triangle_only(tile):
    """Whatever a caller's lower triangle holds (a GEMM's rounding, or garbage), the packed factor is
    that of the upper triangle mirrored: exactly symmetric, and the same on every CPU."""
    n = 45
    S = torch.randn(n, n, dtype=torch.float64)
    P = pack(S, tile)
    sym = S.triu() + S.triu(1).T
    assert torch.equal(P, pack(sym, tile))
    assert torch.equal(unpack(P, n, tile), sym)


@pytest.mark.parametrize("n", [1024, 2048, 4096])
def test_packed_bytes_at_most_052_of_dense(n):
    assert packed_numel(n, TILE) / n ** 2 <= 0.52


def test_bad_tile_and_shape_rejected():
    with pytest.raises(ValueError, match="power of two"):
        pack(spd(5), 12)
    with pytest.raises(ValueError, match="packed factor of n=9"):
        unpack(torch.zeros(10, dtype=torch.float64), 9, 8)


# ---- ops against the float64 dense oracle -------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7, 33, 129, 300])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("tile", [8, 32])
def test_packed_cov_update_matches_dense_float64(backend, n, dtype, masked, tile):
    N = 45
    X = torch.randn(3, N // 3, n).to(dtype)
    mask = (torch.rand(3, N // 3) > 0.4) if masked else None
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    S0 = spd(n)
    P = pack(S0.to(acc), tile)
    ops.packed_cov_update_(P, X, mask, 0.75, tile)
    ref = S0.clone()
    dense_cov_update_(ref, X.double(), mask, 0.75)
    got = unpack(P, n, tile)
    torch.testing.assert_close(got.double(), ref, **TOL[dtype])
    assert torch.equal(got, got.T), "diagonal tiles must stay exactly symmetric"
    nt = -(-n // tile)
    assert torch.equal(pack(got, tile), P), "padding beyond n must stay zero"
    assert P.numel() == nt * (nt + 1) // 2 * tile * tile


def test_packed_cov_update_all_masked_and_empty(backend):
    P = pack(spd(9).float(), 8)
    before = P.clone()
    ops.packed_cov_update_(P, torch.randn(2, 5, 9), torch.zeros(2, 5), 1.0, 8)
    ops.packed_cov_update_(P, torch.randn(0, 9), None, 1.0, 8)
    assert torch.equal(P, before)


def test_packed_cov_update_rejects_wrong_size(backend):
    with pytest.raises((ValueError, RuntimeError), match="packed factor|numbers"):
        ops.packed_cov_update_(torch.zeros(100), torch.randn(4, 9), None, 1.0, 8)


def _packed_problem(classes, tile, dtype=torch.float64):
    """gram_problem's dense problem, and the same factors tile-packed with the packed layout's tables."""
    from lalora_kernels.grouping import GramLayout
    from lalora_kernels.reference import class_views
    dense = gram_problem(classes, dtype)
    layout = GramLayout(classes, tile=tile)
    packed = torch.cat([pack(S, tile) for Sc in class_views(dense[1], dense[4], "S") for S in Sc])
    items, work, pairs, plan = layout.tables()
    tabs = [torch.tensor(t, dtype=torch.int64).reshape(-1, len(t[0])) for t in (items, work, pairs)]
    return dense, (packed, tabs, plan, layout.flat_classes())


@pytest.mark.parametrize("tile", [8, 16, 32])
@pytest.mark.parametrize("arena_dtype", [torch.float64, torch.float32])
def test_packed_grouped_gram_matches_dense(backend, tile, arena_dtype):
    # (600, 4, 1) is split over tasks; (700, 52, 1) has rows left over from blocks of 8 and, in
    # float64, partials too big for the C++ kernel's storage-order pass (it goes by column blocks)
    classes = [(7, 3, 2), (33, 9, 1), (129, 20, 2), (40, 40, 1), (600, 4, 1), (700, 52, 1)]
    (D, arena, tabs, plan, flat), (packed, ptabs, pplan, pflat) = _packed_problem(classes, tile)
    assert pflat[0::6] == flat[0::6] and pflat[1::6] == flat[1::6]
    G_ref, Q_ref = ops.grouped_gram(D, arena, *tabs, plan, flat, 0)
    G, Q = ops.grouped_gram(D.to(arena_dtype), packed.to(arena_dtype), *ptabs, pplan, pflat, tile)
    for got, ref in ((G, G_ref), (Q, Q_ref)):     # fp32: errors relative to the largest entry
        scale = float(ref.abs().max())
        tol = TOL[torch.float64] if arena_dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6 * scale)
        torch.testing.assert_close(got.double(), ref, **tol)


def test_packed_grouped_gram_gradcheck(backend):
    classes = [(9, 3, 2), (17, 5, 1)]
    _, (packed, tabs, plan, pflat) = _packed_problem(classes, 8)
    D = torch.randn(sum(R * n * m for n, R, m in classes), dtype=torch.float64, requires_grad=True)
    W = torch.randn(sum(R * R * m for n, R, m in classes), dtype=torch.float64)
    f = lambda d: (ops.grouped_gram(d, packed, *tabs, plan, pflat, 8)[0] * W).sum()
    assert torch.autograd.gradcheck(f, (D,))


def quad_problem(classes, dtype=torch.float64, seed=0):
    """Random epilogue weights C for grouped_gram_quad on ``classes`` (not symmetric, so that the
    gradient's W + W^T is checked)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(sum(R * R * m for n, R, m in classes), generator=gen, dtype=dtype)


def quad_oracle(D, arena, flat, C):
    """float64 value and gradient of grouped_gram_quad from dense per-class products and autograd."""
    from lalora_kernels.reference import class_views
    D = D.detach().double().requires_grad_()
    G = torch.cat([(Dc @ Sc.double() @ Dc.transpose(1, 2)).reshape(-1)
                   for Dc, Sc in zip(class_views(D, flat, "D"), class_views(arena, flat, "S"))])
    v = 0.5 * (C.double() * G).sum()
    return v.detach(), torch.autograd.grad(v, D)[0]


@pytest.mark.parametrize("tile", [0, 8, 32])
@pytest.mark.parametrize("arena_dtype", [torch.float64, torch.float32])
def test_grouped_gram_quad_value_and_grad(backend, tile, arena_dtype):
    classes = [(7, 3, 2), (33, 9, 1), (129, 20, 2), (600, 4, 1)]
    (D, arena, tabs, plan, flat), (packed, ptabs, pplan, pflat) = _packed_problem(classes, tile or 8)
    C = quad_problem(classes)
    v_ref, g_ref = quad_oracle(D, arena, flat, C)
    args = (arena, *tabs, plan, flat, 0) if tile == 0 else (packed, *ptabs, pplan, pflat, tile)
    Dg = D.to(arena_dtype).requires_grad_()
    v, dD = ops.grouped_gram_quad(Dg, args[0].to(arena_dtype), *args[1:], C.to(arena_dtype), True)
    (g,) = torch.autograd.grad(3.0 * v, Dg)
    tol = TOL[arena_dtype]
    torch.testing.assert_close(v.double(), v_ref, rtol=tol["rtol"], atol=tol["atol"] * float(v_ref.abs()))
    scale = float(g_ref.abs().max())
    torch.testing.assert_close(dD.double(), g_ref, rtol=tol["rtol"], atol=tol["atol"] * scale)
    torch.testing.assert_close(g.double(), 3.0 * g_ref, rtol=tol["rtol"], atol=3 * tol["atol"] * scale)
    v2, none = ops.grouped_gram_quad(D.to(arena_dtype), args[0].to(arena_dtype), *args[1:], C.to(arena_dtype), False)
    assert none.numel() == 0 and torch.equal(v2, v)


def test_grouped_gram_quad_without_grad_cannot_backprop(backend):
    classes = [(9, 3, 2)]
    _, (packed, tabs, plan, flat) = _packed_problem(classes, 8)
    D = torch.randn(54, dtype=torch.float64, requires_grad=True)
    v, _ = ops.grouped_gram_quad(D, packed, *tabs, plan, flat, 8, quad_problem(classes), False)
    with pytest.raises(RuntimeError, match="grad=False"):
        v.backward()


def test_grouped_gram_quad_rejects_bad_weights(backend):
    classes = [(9, 3, 2)]
    _, (packed, tabs, plan, flat) = _packed_problem(classes, 8)
    D = torch.randn(54, dtype=torch.float64)
    with pytest.raises((RuntimeError, ValueError), match="C has 5 numbers"):
        ops.grouped_gram_quad(D, packed, *tabs, plan, flat, 8, quad_problem(classes)[:5], True)


# ---- penalty and curvature on packed factors ---------------------------------------------------
@pytest.mark.parametrize("variant", ["kfac", "tri", "wkfac"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_penalty_on_packed_factors_equals_dense(backend, variant, dtype):
    p = _problem(zero_b=() if variant == "wkfac" else (2,))
    kw = dict(variant=variant, scaling=p["scaling"], Sx=[S.to(dtype) for S in p["Sx"]],
              sx_index=[j for *_, j in LAYOUT], Sg=[S.to(dtype) for S in p["Sg"]])
    dense = LoRACurvature.from_tensors(p["A0"], p["B0"], **kw)
    packed = LoRACurvature.from_tensors(p["A0"], p["B0"], **kw).to_layout("packed", 8)
    assert packed.layout == "packed" and packed.memory_bytes() != dense.memory_bytes()
    assert packed.norm_constant == pytest.approx(dense.norm_constant, rel=1e-6)
    A = [a.detach().to(dtype).requires_grad_() for a in p["A"]]
    B = [b.detach().to(dtype).requires_grad_() for b in p["B"]]
    v_d = LaplacePenalty(dense, lam=1.3, prior_precision=0.2)(A, B)
    g_d = torch.autograd.grad(v_d, A + B)
    v_p = LaplacePenalty(packed, lam=1.3, prior_precision=0.2)(A, B)
    g_p = torch.autograd.grad(v_p, A + B)
    tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(v_p, v_d, **tol)
    for a, b in zip(g_p, g_d):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("variant", ["kfac", "tri", "wkfac"])
def test_estimate_packed_equals_dense_and_files_record_layout(backend, variant, tmp_path):
    model = tiny_llama(dtype=torch.float64)
    data = batches(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = estimate_curvature(model, data, variant=variant, progress=False, storage="dense")
        packed = estimate_curvature(model, data, variant=variant, progress=False, storage="packed", tile=16)
    assert (dense.layout, packed.layout, packed.tile) == ("dense", "packed", 16)
    assert set(dense.tensors) == set(packed.tensors)
    for k, t in dense.tensors.items():
        torch.testing.assert_close(packed.dense(k), t, rtol=1e-10, atol=1e-13)
    assert packed.norm_constant == pytest.approx(dense.norm_constant, rel=1e-10)
    # packed file -> packed; dense file -> packed -> dense, exactly
    packed.save(tmp_path / "p.safetensors")
    dense.save(tmp_path / "d.safetensors")
    back = LoRACurvature.load(tmp_path / "p.safetensors")
    assert (back.layout, back.tile) == ("packed", 16)
    assert all(torch.equal(back.tensors[k], t) for k, t in packed.tensors.items())
    conv = LoRACurvature.load(tmp_path / "d.safetensors", layout="packed", tile=8)
    assert conv.layout == "packed" and conv.memory_bytes() < dense.memory_bytes()
    again = conv.to_layout("dense")
    assert all(torch.equal(again.tensors[k], t) for k, t in dense.tensors.items())


def test_default_storage_follows_backend(monkeypatch):
    model = tiny_llama()
    monkeypatch.setenv("LALORA_BACKEND", "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert estimate_curvature(model, batches(1), progress=False).layout == "dense"
        monkeypatch.setenv("LALORA_BACKEND", "auto")
        assert estimate_curvature(model, batches(1), progress=False).layout == "packed"


def test_wrong_layout_shapes_rejected():
    p = _problem()
    curv = LoRACurvature.from_tensors(p["A0"], p["B0"], variant="wkfac", scaling=p["scaling"], Sx=p["Sx"],
                                      sx_index=[j for *_, j in LAYOUT], Sg=p["Sg"])
    with pytest.raises(ValueError, match="layout='packed'"):
        LoRACurvature(variant="wkfac", fisher="empirical", mc_samples=1, num_tokens=1, adapter_name="a",
                      model_type="m", adapters=curv.adapters, tensors=curv.tensors, layout="packed")
    with pytest.raises(ValueError, match="storage/layout='tiled'"):
        curv.to_layout("tiled")


# ---- bf16 factors: half the bytes again, products in fp32 ---------------------------------------
def bf16_case(variant, layout, tile=8, device="cpu"):
    """The penalty (value, grads) on bf16 factors and, in float64, on the same rounded factors;
    plus the float64 value on the unrounded ones. Returns (penalty, value, grads, ref, ref_grads, exact)."""
    p = _problem(zero_b=() if variant == "wkfac" else (2,))
    kw = dict(variant=variant, scaling=p["scaling"], Sx=p["Sx"], sx_index=[j for *_, j in LAYOUT], Sg=p["Sg"])
    if variant == "diag":
        kw = dict(variant=variant, scaling=p["scaling"], FA=p["FA"], FB=p["FB"])
    curves = [LoRACurvature.from_tensors(p["A0"], p["B0"], **kw) for _ in range(3)]
    exact = curves[2].to(device)
    c16 = curves[0].to(device, dtype=torch.bfloat16)
    c64 = curves[1].to(device, dtype=torch.bfloat16).to(dtype=torch.float64)   # the rounded values, exactly
    if layout == "packed" and variant != "diag":
        for c in (c16, c64, exact):
            c.to_layout("packed", tile)
    outs = []
    for curv, dtype in ((c16, torch.float32), (c64, torch.float64), (exact, torch.float64)):
        A = [a.detach().to(device, dtype).requires_grad_() for a in p["A"]]
        B = [b.detach().to(device, dtype).requires_grad_() for b in p["B"]]
        pen = LaplacePenalty(curv, lam=1.3, prior_precision=0.2)
        v = pen(A, B)
        outs.append((pen, v, torch.autograd.grad(v, A + B)))
    return outs[0][0], outs[0][1], outs[0][2], outs[1][1], outs[1][2], outs[2][1]


@pytest.mark.parametrize("variant", ["kfac", "tri", "wkfac", "diag"])
@pytest.mark.parametrize("layout", ["dense", "packed"])
def test_bf16_factors_halve_bytes_and_compute_in_fp32(backend, variant, layout):
    pen, v, grads, ref, ref_grads, exact = bf16_case(variant, layout)
    if variant != "diag":
        assert pen.arena.dtype == torch.bfloat16
    assert v.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    # only fp32 rounding on top of the bf16 storage: tight against the rounded factors in float64 ...
    torch.testing.assert_close(v.double(), ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5 * float(r.abs().max()))
    # ... and within bf16's relative precision of the unrounded curvature
    assert abs(float(v) - float(exact)) <= 1e-2 * abs(float(exact))


def test_bf16_factors_save_and_load_as_bf16(tmp_path):
    p = _problem()
    curv = LoRACurvature.from_tensors(p["A0"], p["B0"], variant="tri", scaling=p["scaling"], Sx=p["Sx"],
                                      sx_index=[j for *_, j in LAYOUT], Sg=p["Sg"]).to(dtype=torch.bfloat16)
    curv.to_layout("packed", 8).save(tmp_path / "c.safetensors")
    back = LoRACurvature.load(tmp_path / "c.safetensors")
    assert (back.factor_dtype, back.layout) == (torch.bfloat16, "packed")
    assert all(torch.equal(back.tensors[k], t) for k, t in curv.tensors.items())
    assert back.get("A0", next(iter(back.adapters))).dtype == torch.float64      # anchors keep theirs
    A = [a.detach().float() for a in p["A"]]
    B = [b.detach().float() for b in p["B"]]
    assert torch.equal(LaplacePenalty(back, lam=1.0)(A, B), LaplacePenalty(curv, lam=1.0)(A, B))


def test_unsupported_factor_dtype_is_rejected():
    p = _problem()
    curv = LoRACurvature.from_tensors(p["A0"], p["B0"], variant="kfac", scaling=p["scaling"], Sx=p["Sx"],
                                      sx_index=[j for *_, j in LAYOUT], Sg=p["Sg"]).to(dtype=torch.float16)
    with pytest.raises(ValueError, match="float16.*curvature.to\\(dtype=torch.float32\\)"):
        LaplacePenalty(curv, lam=1.0)


# ---- C++: determinism, fallback ----------------------------------------------------------------
def test_cpp_results_are_bitwise_identical_run_to_run_and_across_threads(cpp_ops):
    classes = [(300, 16, 3), (1000, 8, 1), (64, 40, 2)]
    _, (packed, tabs, plan, pflat) = _packed_problem(classes, 32, torch.float64)
    packed = packed.float()
    D = torch.randn(sum(R * n * m for n, R, m in classes))
    X = torch.randn(700, 300)
    mask = torch.rand(700) > 0.2
    threads = torch.get_num_threads()
    outs = []
    try:
        for t in (threads, threads, 1):
            torch.set_num_threads(t)
            G, Q = cpp_ops.packed_gram(D, packed, pflat, 32)
            v, dD = cpp_ops.packed_gram_quad(D, packed, pflat, 32, quad_problem(classes, torch.float32), True)
            P = torch.zeros(packed_numel(300, 32))
            cpp_ops.packed_cov_update_(P, X, mask, 0.5, 32)
            outs.append((G, Q, v, dD, P))
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))


def test_fallback_to_reference_warns_once(monkeypatch):
    monkeypatch.setattr(_cpp, "_state", {"error": "ImportError: _C was not built (test)"})
    monkeypatch.setenv("LALORA_BACKEND", "auto")
    assert lalora_kernels.backends()["cpu"] == "torch"
    P = pack(spd(9).float(), 8)
    ref = P.clone()
    X = torch.randn(6, 9)
    with pytest.warns(_cpp.CppFallbackWarning, match="not built.*no-build-isolation"):
        ops.packed_cov_update_(P, X, None, 1.0, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # only once
        ops.packed_cov_update_(P, X, None, 1.0, 8)
    packed_cov_update_(ref, X, None, 1.0, 8)
    packed_cov_update_(ref, X, None, 1.0, 8)
    assert torch.equal(P, ref)
    assert lops.default_storage("cpu", warn=False) == "dense"
    monkeypatch.setenv("LALORA_BACKEND", "cpp")
    with pytest.raises(ValueError, match="LALORA_BACKEND=cpp but lalora_kernels._C is not available"):
        ops.packed_cov_update_(P, X, None, 1.0, 8)


def test_fallback_when_extension_cannot_be_imported():
    """A real failed import (``_C`` blocked): the package still works, says so once, on the reference."""
    code = (
        "import sys, warnings\n"
        "sys.modules['lalora_kernels._C'] = None\n"
        "import torch, lalora_kernels\n"
        "from lalora_kernels.reference import pack\n"
        "info = lalora_kernels.backends()\n"
        "assert info['cpu'] == 'torch' and not info['cpp']['available'], info\n"
        "assert 'ImportError' in info['cpp']['error'] or 'ModuleNotFound' in info['cpp']['error'], info\n"
        "P = pack(torch.eye(5), 8)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(3):\n"
        "        torch.ops.lalora.packed_cov_update_(P, torch.randn(4, 5), None, 1.0, 8)\n"
        "assert len([x for x in w if 'C++ CPU kernels' in str(x.message)]) == 1, [str(x.message) for x in w]\n"
        "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "LALORA_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_cpu_capability_is_chosen_at_run_time_and_capped_by_the_environment():
    """One build carries the tile products for every x86 level; LALORA_CPU_CAPABILITY (else
    ATEN_CPU_CAPABILITY) caps the one in use, which is how make test runs them all on one CPU."""
    code = "import lalora_kernels._cpp as c; print(c.capability())"
    def run(**env):
        full = {k: v for k, v in os.environ.items() if not k.endswith("CPU_CAPABILITY")}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**full, **env},
                             timeout=300)
        return out.returncode, out.stdout.strip(), out.stderr
    rc, best, err = run()
    assert rc == 0 and best in ("avx512", "avx2", "default"), err[-2000:]
    assert run(LALORA_CPU_CAPABILITY="default")[1] == "default"
    assert run(ATEN_CPU_CAPABILITY="default")[1] == "default"
    assert run(LALORA_CPU_CAPABILITY="avx2")[1] == ("default" if best == "default" else "avx2")
    assert run(LALORA_CPU_CAPABILITY="avx512")[1] == best          # a cap never raises the level
    rc, _, err = run(LALORA_CPU_CAPABILITY="sse9")
    assert rc != 0 and "LALORA_CPU_CAPABILITY=sse9 is unknown; use default, avx2 or avx512" in err
