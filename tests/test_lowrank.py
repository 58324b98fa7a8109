"""Low-rank-plus-tail factors (reference.lowrank_format, capture_lowrank): exact for the compressed
factor, trace kept, files, the budgeted capture's peak, the sketch, and the op on every backend."""
import warnings

import pytest
import torch
from conftest import DEV, assert_close_like_torch
from problems import batches, curvature_of, penalty_problem, spd, tiny_llama

from lalora_kernels import LaplacePenalty, LoRACurvature, estimate_curvature
from lalora_kernels.capture_lowrank import LowRank
from lalora_kernels.gram_meta import GramMeta
from lalora_kernels.reference.lowrank_format import compress, expand, trace

ops = torch.ops.lalora


def _estimate(storage, variant="tri", model=None, data=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return estimate_curvature(model or tiny_llama(), data or batches(3), variant=variant, progress=False,
                                  storage=storage, **kw)


@pytest.mark.parametrize("k", [1, 3, 9])
def test_compress_keeps_the_top_eigenpairs_and_the_trace(k):
    S = spd(9)
    U, E = compress(S, k)
    lam = torch.linalg.eigvalsh(S).flip(0)
    torch.testing.assert_close(E[1:], lam[:k], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(U.T @ U, torch.eye(k, dtype=S.dtype), rtol=0, atol=1e-12)
    assert trace(U, E) == pytest.approx(float(S.trace()), rel=1e-13)
    Sc = expand(U, E)
    assert torch.equal(Sc, Sc.T)
    if k == 9:
        torch.testing.assert_close(Sc, S, rtol=1e-12, atol=1e-12)


def test_the_grouped_op_is_the_dense_product_of_the_compressed_factor(backend):
    shapes = [(9, 3, 2), (20, 4, 1)]
    ks = [4, 7]
    meta = GramMeta.build(shapes, 0, sizes=[n * k for (n, _, _), k in zip(shapes, ks)])
    Us, Es, dense = [], [], []
    for (n, _, m), k in zip(shapes, ks):
        for _ in range(m):
            U, E = compress(spd(n), k)
            Us.append(U.reshape(-1))
            Es.append(E)
            dense.append(expand(U, E))
    ranks, e = [], 0
    for (_, _, m), k in zip(shapes, ks):
        ranks += [k, e]
        e += m * (k + 1)
    D = torch.randn(meta.d_size, dtype=torch.float64)
    G, Q = ops.grouped_gram_lowrank(D.to(DEV), torch.cat(Us).to(DEV), torch.cat(Es).to(DEV), meta.classes, ranks)
    from lalora_kernels.reference.grouped_gram import class_views
    Dd = torch.cat([s.reshape(-1) for s in dense])
    dense_classes = GramMeta.build(shapes).classes
    Gr = torch.cat([(d @ s @ d.transpose(1, 2)).reshape(-1) for d, s in
                    zip(class_views(D, dense_classes, "D"), class_views(Dd, dense_classes, "S"))])
    Qr = torch.cat([(d @ s).reshape(-1) for d, s in zip(class_views(D, dense_classes, "D"),
                                                        class_views(Dd, dense_classes, "S"))])
    assert_close_like_torch(G, Gr, Gr)
    assert_close_like_torch(Q, Qr, Qr)
    torch.library.opcheck(ops.grouped_gram_lowrank, (D.clone().requires_grad_(), torch.cat(Us), torch.cat(Es),
                                                      meta.classes, ranks))


@pytest.mark.parametrize("variant", ["kfac", "tri", "wkfac"])
@pytest.mark.parametrize("k", [1, 4])
def test_penalty_is_exact_for_the_compressed_factor(variant, k):
    """LaplacePenalty on low-rank factors equals it on the dense matrices built from (U, lam, rho),
    value and gradients, to float64 rounding (the small factors Caa, Cbb, Ka, Kb stay exact in both)."""
    p = penalty_problem(zero_b=() if variant == "wkfac" else (2,))
    low = curvature_of(p, variant).to_layout("lowrank", rank=k)
    dense = curvature_of(p, variant).to_layout("lowrank", rank=k).to_layout("dense")
    outs = []
    for curv in (low, dense):
        A = [a.detach().requires_grad_() for a in p["A"]]
        B = [b.detach().requires_grad_() for b in p["B"]]
        v = LaplacePenalty(curv, lam=1.3, prior_precision=0.2)(A, B)
        outs.append((v, torch.autograd.grad(v, A + B)))
    (v1, g1), (v2, g2) = outs
    torch.testing.assert_close(v1, v2, rtol=1e-12, atol=1e-14)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)
    assert low.memory_bytes() < curvature_of(p, variant).memory_bytes()


@pytest.mark.parametrize("capture", ["exact", "sketch"])
def test_capture_keeps_every_trace_exactly(capture):
    exact = _estimate("dense")
    low = _estimate(LowRank(rank=3, capture=capture))
    assert low.layout == "lowrank" and low.norm_constant == pytest.approx(exact.norm_constant, rel=1e-10)
    for key in exact.tensors:
        if key.startswith(("Sx/", "Sg/")):
            assert low.trace(key) == pytest.approx(exact.trace(key), rel=1e-10), key
            assert low.tensors[key].shape[1] == min(3, exact.dim(key))


def test_exact_capture_is_the_truncated_eigendecomposition_and_energy_picks_the_fewest():
    exact = _estimate("dense")
    low = _estimate(LowRank(rank=3))
    energy = _estimate(LowRank(energy=0.9))
    for key in exact.tensors:
        if not key.startswith(("Sx/", "Sg/")):
            continue
        U, E = compress(exact.dense(key), 3)
        torch.testing.assert_close(low.dense(key), expand(U, E), rtol=1e-9, atol=1e-12)
        lam = torch.linalg.eigvalsh(exact.dense(key)).flip(0).clamp_min(0)
        k = energy.tensors[key].shape[1]
        total = float(exact.dense(key).trace())
        assert float(lam[:k].sum()) >= 0.9 * total - 1e-12 and (k == 1 or float(lam[:k - 1].sum()) < 0.9 * total)


def test_budgeted_capture_stays_under_its_budget_and_equals_one_pass():
    """A budget smaller than all factors: several proxy passes, each holding at most ``budget`` bytes of
    factor accumulators (measured), and the same curvature as one pass (MC draws repeated per pass)."""
    kw = dict(variant="tri", fisher="mc", generator=torch.Generator().manual_seed(1))
    whole = _estimate(LowRank(rank=3), **kw)
    kw["generator"] = torch.Generator().manual_seed(1)
    budget = 60000
    parts = _estimate(LowRank(rank=3, budget=budget), **kw)
    assert whole.capture_stats["passes"] == 1 and parts.capture_stats["passes"] > 2
    assert parts.capture_stats["peak_factor_bytes"] <= budget < whole.capture_stats["peak_factor_bytes"]
    assert set(parts.tensors) == set(whole.tensors) and list(parts.adapters) == list(whole.adapters)
    for key, t in whole.tensors.items():
        torch.testing.assert_close(parts.dense(key), whole.dense(key), rtol=1e-9, atol=1e-12)


def test_budget_too_small_for_one_layer_group_is_refused():
    with pytest.raises(ValueError, match="alone need .* bytes, more than budget=1000; raise the budget"):
        _estimate(LowRank(rank=3, budget=1000))


def test_sketch_of_full_width_recovers_the_factor():
    exact = _estimate("dense", variant="wkfac")
    low = _estimate(LowRank(rank=64, oversample=0, capture="sketch"), variant="wkfac")
    for key in exact.tensors:
        if key.startswith(("Sx/", "Sg/")):
            e = exact.dense(key)
            assert float((low.dense(key) - e).norm() / e.norm()) < 1e-3, key


def test_sketch_is_close_to_the_best_rank_k():
    exact = _estimate("dense", variant="wkfac")
    low = _estimate(LowRank(rank=4, oversample=16, capture="sketch"), variant="wkfac")
    for key in exact.tensors:
        if key.startswith(("Sx/", "Sg/")):
            e = exact.dense(key)
            best = expand(*compress(e, 4))
            assert float((low.dense(key) - e).norm()) <= 1.5 * float((best - e).norm()) + 1e-12, key


def test_files_bf16_and_views(tmp_path):
    low = _estimate(LowRank(rank=3), variant="wkfac")
    low.save(tmp_path / "c.safetensors")
    back = LoRACurvature.load(tmp_path / "c.safetensors")
    assert back.layout == "lowrank" and all(torch.equal(back.tensors[k], t) for k, t in low.tensors.items())
    half = _estimate(LowRank(rank=3), variant="wkfac").to(dtype=torch.bfloat16)
    assert half.factor_dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for k, t in half.tensors.items() if k.startswith(("SxE/", "SgE/")))
    half.save(tmp_path / "h.safetensors")
    assert LoRACurvature.load(tmp_path / "h.safetensors").factor_dtype == torch.bfloat16
    name = next(iter(low.adapters))
    blocks = low.kfac_blocks(name)
    assert blocks["lora_A"]["input_cov"].shape == (low.adapters[name].in_features,) * 2
    sub = low.subset([name])
    assert set(sub.tensors) < set(low.tensors) and any(k.startswith("SgE/") for k in sub.tensors)


def test_sketch_within_its_budget_and_refused_beyond():
    need = _estimate(LowRank(rank=3, capture="sketch")).capture_stats["peak_factor_bytes"]
    ok = _estimate(LowRank(rank=3, capture="sketch", budget=need))
    assert ok.capture_stats["peak_factor_bytes"] <= need
    with pytest.raises(ValueError, match="capture='sketch' at rank 3 holds .* more than budget"):
        _estimate(LowRank(rank=3, capture="sketch", budget=need - 1))
