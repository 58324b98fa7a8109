"""Grouped penalty (LaplacePenalty / LaLoRARegularizer / fused_laplace_penalty) vs the per-adapter
closed form and the dense forms, on mixed shapes, shared inputs, mixed ranks and dtypes."""
import pytest
import torch
from conftest import TOL
from dense import dense_value, spd
from models import batches, tiny_llama

from lalora_kernels import (LaLoRARegularizer, LaplacePenalty, LoRACurvature, estimate_curvature,
                            fused_laplace_penalty)
from lalora_kernels.lora_layers import find_lora_layers
from lalora_kernels.reference import finalize, penalty_closed_form

# (o, i, r, sx_index): adapters 0-2 share input 0 (q/k/v-like with GQA shapes), 3 has its own,
# 4-5 share input 2 with another rank, 6 is an odd one-off; adapter 2 has B* = 0.
LAYOUT = [(9, 7, 3, 0), (5, 7, 3, 0), (5, 7, 3, 0), (7, 9, 3, 1), (11, 7, 2, 2), (11, 7, 2, 2),
          (1, 13, 1, 3)]
SX_DIMS = [7, 9, 7, 13]


def _problem(dtype=torch.float64, zero_b=(2,)):
    Sx = [spd(n) for n in SX_DIMS]
    A0 = [torch.randn(r, i, dtype=torch.float64) for o, i, r, _ in LAYOUT]
    B0 = [torch.zeros(o, r, dtype=torch.float64) if k in zero_b else torch.randn(o, r, dtype=torch.float64)
          for k, (o, i, r, _) in enumerate(LAYOUT)]
    Sg = [spd(o) for o, *_ in LAYOUT]
    FA = [torch.rand(r, i, dtype=torch.float64) for o, i, r, _ in LAYOUT]
    FB = [torch.rand(o, r, dtype=torch.float64) for o, i, r, _ in LAYOUT]
    A = [(a + 0.2 * torch.randn_like(a)).to(dtype).requires_grad_() for a in A0]
    B = [(b + 0.2 * torch.randn_like(b)).to(dtype).requires_grad_() for b in B0]
    scaling = [0.5 + k / 4 for k in range(len(LAYOUT))]
    return dict(A=A, B=B, A0=A0, B0=B0, Sx=Sx, Sg=Sg, FA=FA, FB=FB, scaling=scaling)


def _closed_sum(variant, p, lam, delta):
    total, gA, gB = 0.0, [], []
    for k, (o, i, r, j) in enumerate(LAYOUT):
        A, B = p["A"][k].detach().double(), p["B"][k].detach().double()
        skip_a = variant in ("kfac", "tri") and not p["B0"][k].any()
        Sx = None if skip_a else p["Sx"][j]
        fin = finalize(p["A0"][k], p["B0"][k], Sx, p["Sg"][k])
        if skip_a:
            fin["Caa"] = p["A0"][k] @ p["Sx"][j] @ p["A0"][k].T
        v, a, b = penalty_closed_form(variant, A, B, p["A0"][k], p["B0"][k], scaling=p["scaling"][k],
                                      lam=lam, delta=delta, Sx=Sx, Sg=p["Sg"][k],
                                      FA=None if skip_a or variant != "diag" else p["FA"][k],
                                      FB=p["FB"][k], **fin)
        total, gA, gB = total + v, gA + [a], gB + [b]
    return total, gA, gB


def _fused(variant, p, lam, delta, **kw):
    skip = [variant in ("kfac", "tri") and not b.any() for b in p["B0"]]
    caa = [p["A0"][k] @ p["Sx"][j] @ p["A0"][k].T for k, (*_, j) in enumerate(LAYOUT)]
    return fused_laplace_penalty(
        p["A"], p["B"], p["A0"], p["B0"], variant=variant, scaling=p["scaling"], lam=lam,
        prior_precision=delta, Sx=p["Sx"], sx_index=[None if s else j for s, (*_, j) in zip(skip, LAYOUT)],
        Sg=p["Sg"], Caa=caa if variant in ("kfac", "tri") else None,
        FA=[None if s else f for s, f in zip(skip, p["FA"])] if variant == "diag" else None,
        FB=p["FB"] if variant == "diag" else None, **kw)


@pytest.mark.parametrize("variant", ["kfac", "tri", "wkfac", "diag"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_grouped_penalty_equals_closed_form(variant, dtype):
    p = _problem(dtype)
    lam, delta = 1.3, 0.2
    value = _fused(variant, p, lam, delta)
    value.backward()
    ref, gA, gB = _closed_sum(variant, p, lam, delta)
    tol = TOL[dtype]
    torch.testing.assert_close(value.double(), ref, **tol)
    for k in range(len(LAYOUT)):
        assert p["A"][k].grad.dtype == dtype
        torch.testing.assert_close(p["A"][k].grad.double(), gA[k], **tol)
        torch.testing.assert_close(p["B"][k].grad.double(), gB[k], **tol)


@pytest.mark.parametrize("variant", ["kfac", "tri", "wkfac"])
def test_grouped_penalty_equals_dense_sum(variant):
    p = _problem(zero_b=())
    value = _fused(variant, p, 0.7, 0.1)
    dense = sum(dense_value(variant, a.detach(), b.detach(), a0, b0, s, 0.7, 0.1, Sx=p["Sx"][j], Sg=g)
                for a, b, a0, b0, s, g, (*_, j) in zip(p["A"], p["B"], p["A0"], p["B0"], p["scaling"],
                                                       p["Sg"], LAYOUT))
    torch.testing.assert_close(value, dense)


def test_penalty_is_zero_at_anchor_and_prior_alone_is_l2():
    p = _problem()
    at_anchor = [a.detach().clone() for a in p["A0"]], [b.detach().clone() for b in p["B0"]]
    curv = LoRACurvature.from_tensors(p["A0"], p["B0"], variant="wkfac", scaling=p["scaling"], Sx=p["Sx"],
                                      sx_index=[j for *_, j in LAYOUT], Sg=p["Sg"])
    assert LaplacePenalty(curv, lam=5.0, prior_precision=1.0)(*at_anchor) == 0
    l2 = LaplacePenalty(curv, lam=0.0, prior_precision=2.0)(p["A"], p["B"])
    ref = sum((a.detach() - a0).square().sum() + (b.detach() - b0).square().sum()
              for a, b, a0, b0 in zip(p["A"], p["B"], p["A0"], p["B0"]))
    torch.testing.assert_close(l2, ref)


@pytest.mark.parametrize("zero_b", [(), (2,)])
@pytest.mark.parametrize("variant", ["kfac", "tri", "wkfac", "diag"])
def test_mean_diag_normalisation(variant, zero_b):
    """c = mean of the dense curvature's diagonal over the penalised parameters; a block proven
    zero (B* = 0 under kfac/tri/diag) counts no parameters (SPEC section 6, project note)."""
    p = _problem(zero_b=zero_b)
    skip = [variant != "wkfac" and not b.any() for b in p["B0"]]
    curv = LoRACurvature.from_tensors(
        p["A0"], p["B0"], variant=variant, scaling=p["scaling"], Sx=p["Sx"], sx_index=[j for *_, j in LAYOUT],
        Sg=p["Sg"], FA=[None if z else f for z, f in zip(skip, p["FA"])] if variant == "diag" else None,
        FB=p["FB"] if variant == "diag" else None)
    dense = __import__("dense")
    diags = []
    for k, (s, a0, b0, g, (o, i, r, j)) in enumerate(zip(p["scaling"], p["A0"], p["B0"], p["Sg"], LAYOUT)):
        if variant == "wkfac":
            d = torch.diagonal(s**2 * torch.kron(g, p["Sx"][j]))            # over the o i entries of dW
        elif variant == "diag":
            d = torch.cat([p["FA"][k].reshape(-1), p["FB"][k].reshape(-1)])
        else:
            d = torch.diagonal(dense.dense_kfac_blocks(variant, s, a0, b0, p["Sx"][j], g))
        diags.append(d[r * i:] if skip[k] else d)                          # the A block is not penalised
    c = torch.cat(diags).mean()
    torch.testing.assert_close(torch.tensor(curv.norm_constant, dtype=torch.float64), c)
    raw = LaplacePenalty(curv, lam=1.0, normalize=None)(p["A"], p["B"])
    normed = LaplacePenalty(curv, lam=1.0, normalize="mean_diag")(p["A"], p["B"])
    torch.testing.assert_close(normed, raw / c)


@pytest.mark.parametrize("variant", ["kfac", "tri", "wkfac", "diag"])
def test_regularizer_on_peft_model_matches_closed_form(variant):
    import warnings
    model = tiny_llama(nonzero_b=variant != "kfac")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        curv = estimate_curvature(model, batches(), variant=variant, progress=False)
    reg = LaLoRARegularizer(curv, lam=2.0, prior_precision=0.3)
    refs = find_lora_layers(model)
    with torch.no_grad():
        for r in refs:
            r.A.add_(0.1 * torch.randn_like(r.A))
            r.B.add_(0.1 * torch.randn_like(r.B))
    value = reg(model)
    value.backward()
    total = 0.0
    for r in refs:
        n, a = r.name, curv.adapters[r.name]
        kw = {k: curv.get(k, n) for k in ("Caa", "Cbb", "Ka", "Kb", "FA", "FB")}
        kw["Sg"] = curv.dense(f"Sg/{n}")
        v, gA, gB = penalty_closed_form(variant, r.A.detach(), r.B.detach(), curv.get("A0", n),
                                        curv.get("B0", n), scaling=a.scaling, lam=2.0 / curv.norm_constant,
                                        delta=0.3, Sx=curv.sx(n), **kw)
        total = total + v
        torch.testing.assert_close(r.A.grad, gA)
        torch.testing.assert_close(r.B.grad, gB)
    torch.testing.assert_close(value, total)


@pytest.mark.parametrize("variant", ["kfac", "tri", "wkfac"])
def test_fp32_accurate_close_to_anchor(variant):
    """Near theta* the penalty is O(|dtheta|^2); fp32 must not drown it in cancellation error."""
    p = _problem(zero_b=())
    for k in range(len(LAYOUT)):
        p["A"][k] = (p["A0"][k] + 1e-4 * torch.randn_like(p["A0"][k])).float().requires_grad_()
        p["B"][k] = (p["B0"][k] + 1e-4 * torch.randn_like(p["B0"][k])).float().requires_grad_()
    p32 = dict(p, A0=[a.float() for a in p["A0"]], B0=[b.float() for b in p["B0"]],
               Sx=[s.float() for s in p["Sx"]], Sg=[s.float() for s in p["Sg"]])
    value = _fused(variant, p32, 1.0, 0.0)
    value.backward()
    ref, gA, gB = _closed_sum(variant, dict(p, A=[a.double() for a in p["A"]],
                                            B=[b.double() for b in p["B"]]), 1.0, 0.0)
    assert abs(float(value) - float(ref)) <= 1e-3 * float(ref)
    for k in range(len(LAYOUT)):
        torch.testing.assert_close(p["A"][k].grad.double(), gA[k], rtol=1e-3, atol=1e-3 * gA[k].abs().max())
        torch.testing.assert_close(p["B"][k].grad.double(), gB[k], rtol=1e-3, atol=1e-3 * gB[k].abs().max())


def test_wkfac_is_tri_plus_third_order():
    """wkfac = tri + O(|dtheta|^3) (SPEC section 4, project note): both are the base layer's K-FAC
    form, tri on the first-order weight change, so their difference shrinks 1000x per 10x in dtheta."""
    p = _problem(zero_b=())
    dirs = [torch.randn_like(a) for a in p["A0"]], [torch.randn_like(b) for b in p["B0"]]
    gaps, values = [], []
    for t in (1e-2, 1e-3):
        q = dict(p, A=[a0 + t * d for a0, d in zip(p["A0"], dirs[0])], B=[b0 + t * d for b0, d in zip(p["B0"], dirs[1])])
        wk, tri = _fused("wkfac", q, 1.0, 0.0), _fused("tri", q, 1.0, 0.0)
        gaps.append(float(wk - tri))
        values.append(float(tri))
    assert 50 < values[0] / values[1] < 200          # both are second order in dtheta ...
    assert 300 < abs(gaps[0] / gaps[1]) < 3000      # ... and differ at third order


def test_wkfac_never_forms_the_weight_change():
    """SPEC section 4: wkfac works on the r-row factors; no (o x r) @ (r x i) product (dW or B A)
    is formed in the forward or the backward pass."""
    from torch.utils._python_dispatch import TorchDispatchMode

    p = _problem(torch.float64, zero_b=())
    dims = {(o, r, i) for o, i, r, _ in LAYOUT if o != r}   # o = r = 1 looks like the r x r @ r x i gradient
    products = []

    class Products(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default):
                a, b = args[0].shape, args[1].shape
                products.append((a[-2], a[-1], b[-1]))
            return func(*args, **(kwargs or {}))

    with Products():
        value = _fused("wkfac", p, 1.0, 0.0)
        value.backward()
    assert products, "the mode saw no products"
    formed = [m for m in products if m in dims]
    assert not formed, f"(o, r, i) products formed: {formed}"
