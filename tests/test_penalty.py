"""Grouped penalty (LaplacePenalty / LaLoRARegularizer / fused_laplace_penalty) vs the per-adapter
closed form and the dense forms, on mixed shapes, shared inputs, mixed ranks and dtypes."""
import pytest
import torch
from conftest import DEV, assert_close_like_torch
from dense import dense_kfac_blocks, dense_value
from problems import (LAYOUT, SX_INDEX, batches, bf16_case, closed_sum, closed_sum_on_model, curvature_of, fused,
                      penalty_problem, tiny_llama)

from lalora_kernels import LaLoRARegularizer, LaplacePenalty, LoRACurvature, estimate_curvature
from lalora_kernels.lora_layers import find_lora_layers


def _on(p, dtype, device):
    """The problem's weights and factors in ``dtype`` on ``device`` (weights fresh leaves)."""
    on = lambda ts: [t.detach().to(device, dtype) for t in ts]  # noqa: E731
    return dict(p, A=[a.requires_grad_() for a in on(p["A"])], B=[b.requires_grad_() for b in on(p["B"])],
                A0=on(p["A0"]), B0=on(p["B0"]), Sx=on(p["Sx"]), Sg=on(p["Sg"]), FA=on(p["FA"]), FB=on(p["FB"]))


@pytest.mark.parametrize("variant", ["kfac", "tri", "wkfac", "diag"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grouped_penalty_equals_closed_form(backend, variant, dtype):
    """The whole penalty through the op layer on every backend, factors and weights in ``dtype``."""
    p = penalty_problem()
    q = _on(p, dtype, DEV)
    value = fused(variant, q, 1.3, 0.2)
    value.backward()
    ref, gA, gB = closed_sum(variant, p, 1.3, 0.2)
    base, bA, bB = closed_sum(variant, p, 1.3, 0.2, dtype=dtype)
    assert_close_like_torch(value, torch.as_tensor(ref), torch.as_tensor(base))
    for k in range(len(LAYOUT)):
        assert q["A"][k].grad.dtype == dtype
        assert_close_like_torch(q["A"][k].grad, gA[k], bA[k])
        assert_close_like_torch(q["B"][k].grad, gB[k], bB[k])


def test_low_precision_weights_with_float64_factors():
    """bf16 LoRA weights go in, gradients come out in bf16; products run in the factors' dtype."""
    p = penalty_problem(torch.bfloat16)
    value = fused("tri", p, 1.3, 0.2)
    value.backward()
    ref, gA, gB = closed_sum("tri", p, 1.3, 0.2)          # on the same (bf16-rounded) weights
    assert value.dtype == torch.float64
    assert_close_like_torch(value, torch.as_tensor(ref), torch.as_tensor(ref))
    for k in range(len(LAYOUT)):
        assert p["A"][k].grad.dtype == torch.bfloat16
        assert_close_like_torch(p["A"][k].grad, gA[k], gA[k].bfloat16())


@pytest.mark.parametrize("variant", ["kfac", "tri", "wkfac"])
def test_grouped_penalty_equals_dense_sum(variant):
    p = penalty_problem(zero_b=())
    value = fused(variant, p, 0.7, 0.1)
    dense = sum(dense_value(variant, a.detach(), b.detach(), a0, b0, s, 0.7, 0.1, Sx=p["Sx"][j], Sg=g)
                for a, b, a0, b0, s, g, (*_, j) in zip(p["A"], p["B"], p["A0"], p["B0"], p["scaling"],
                                                       p["Sg"], LAYOUT))
    torch.testing.assert_close(value, dense)


def test_penalty_is_zero_at_anchor_and_prior_alone_is_l2():
    p = penalty_problem()
    at_anchor = [a.detach().clone() for a in p["A0"]], [b.detach().clone() for b in p["B0"]]
    curv = LoRACurvature.from_tensors(p["A0"], p["B0"], variant="wkfac", scaling=p["scaling"], Sx=p["Sx"],
                                      sx_index=SX_INDEX, Sg=p["Sg"])
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
    p = penalty_problem(zero_b=zero_b)
    skip = [variant != "wkfac" and not b.any() for b in p["B0"]]
    curv = LoRACurvature.from_tensors(
        p["A0"], p["B0"], variant=variant, scaling=p["scaling"], Sx=p["Sx"], sx_index=SX_INDEX,
        Sg=p["Sg"], FA=[None if z else f for z, f in zip(skip, p["FA"])] if variant == "diag" else None,
        FB=p["FB"] if variant == "diag" else None)
    diags = []
    for k, (s, a0, b0, g, (o, i, r, j)) in enumerate(zip(p["scaling"], p["A0"], p["B0"], p["Sg"], LAYOUT)):
        if variant == "wkfac":
            d = torch.diagonal(s**2 * torch.kron(g, p["Sx"][j]))            # over the o i entries of dW
        elif variant == "diag":
            d = torch.cat([p["FA"][k].reshape(-1), p["FB"][k].reshape(-1)])
        else:
            d = torch.diagonal(dense_kfac_blocks(variant, s, a0, b0, p["Sx"][j], g))
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
    total, grads = closed_sum_on_model(curv, refs, variant, lam=2.0 / curv.norm_constant, delta=0.3)
    for r, (gA, gB) in zip(refs, grads):
        torch.testing.assert_close(r.A.grad, gA)
        torch.testing.assert_close(r.B.grad, gB)
    torch.testing.assert_close(value, total)


@pytest.mark.parametrize("variant", ["kfac", "tri", "wkfac"])
def test_fp32_accurate_close_to_anchor(variant):
    """Near theta* the penalty is O(|dtheta|^2); fp32 must not drown it in cancellation error."""
    p = penalty_problem(zero_b=())
    for k in range(len(LAYOUT)):
        p["A"][k] = (p["A0"][k] + 1e-4 * torch.randn_like(p["A0"][k])).float().requires_grad_()
        p["B"][k] = (p["B0"][k] + 1e-4 * torch.randn_like(p["B0"][k])).float().requires_grad_()
    p32 = dict(p, A0=[a.float() for a in p["A0"]], B0=[b.float() for b in p["B0"]],
               Sx=[s.float() for s in p["Sx"]], Sg=[s.float() for s in p["Sg"]])
    value = fused(variant, p32, 1.0, 0.0)
    value.backward()
    ref, gA, gB = closed_sum(variant, dict(p, A=[a.double() for a in p["A"]],
                                            B=[b.double() for b in p["B"]]), 1.0, 0.0)
    assert abs(float(value) - float(ref)) <= 1e-3 * float(ref)
    for k in range(len(LAYOUT)):
        torch.testing.assert_close(p["A"][k].grad.double(), gA[k], rtol=1e-3, atol=1e-3 * gA[k].abs().max())
        torch.testing.assert_close(p["B"][k].grad.double(), gB[k], rtol=1e-3, atol=1e-3 * gB[k].abs().max())


def test_wkfac_is_tri_plus_third_order():
    """wkfac = tri + O(|dtheta|^3) (SPEC section 4, project note): both are the base layer's K-FAC
    form, tri on the first-order weight change, so their difference shrinks 1000x per 10x in dtheta."""
    p = penalty_problem(zero_b=())
    dirs = [torch.randn_like(a) for a in p["A0"]], [torch.randn_like(b) for b in p["B0"]]
    gaps, values = [], []
    for t in (1e-2, 1e-3):
        q = dict(p, A=[a0 + t * d for a0, d in zip(p["A0"], dirs[0])], B=[b0 + t * d for b0, d in zip(p["B0"], dirs[1])])
        wk, tri = fused("wkfac", q, 1.0, 0.0), fused("tri", q, 1.0, 0.0)
        gaps.append(float(wk - tri))
        values.append(float(tri))
    assert 50 < values[0] / values[1] < 200          # both are second order in dtheta ...
    assert 300 < abs(gaps[0] / gaps[1]) < 3000      # ... and differ at third order


def test_wkfac_never_forms_the_weight_change():
    """SPEC section 4: wkfac works on the r-row factors; no (o x r) @ (r x i) product (dW or B A)
    is formed in the forward or the backward pass."""
    from torch.utils._python_dispatch import TorchDispatchMode

    p = penalty_problem(torch.float64, zero_b=())
    dims = {(o, r, i) for o, i, r, _ in LAYOUT if o != r}   # o = r = 1 looks like the r x r @ r x i gradient
    products = []

    class Products(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default):
                a, b = args[0].shape, args[1].shape
                products.append((a[-2], a[-1], b[-1]))
            return func(*args, **(kwargs or {}))

    with Products():
        value = fused("wkfac", p, 1.0, 0.0)
        value.backward()
    assert products, "the mode saw no products"
    formed = [m for m in products if m in dims]
    assert not formed, f"(o, r, i) products formed: {formed}"


# ---- storage: tile-packed and bf16 factors ------------------------------------------------------
@pytest.mark.parametrize("variant", ["kfac", "tri", "wkfac"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_penalty_on_packed_factors_equals_dense(backend, variant, dtype):
    p = penalty_problem(zero_b=() if variant == "wkfac" else (2,))
    q = _on(p, dtype, DEV)
    dense = curvature_of(q, variant, DEV)
    packed = curvature_of(q, variant, DEV).to_layout("packed", 16)
    assert packed.layout == "packed" and packed.memory_bytes() != dense.memory_bytes()
    assert packed.norm_constant == pytest.approx(dense.norm_constant, rel=1e-6)
    outs = []
    for curv in (dense, packed):
        v = LaplacePenalty(curv, lam=1.3, prior_precision=0.2)(q["A"], q["B"])
        outs.append((v, torch.autograd.grad(v, q["A"] + q["B"])))
    ref_curv = curvature_of(p, variant)
    A64 = [a.detach().double().requires_grad_() for a in q["A"]]
    B64 = [b.detach().double().requires_grad_() for b in q["B"]]
    ref = LaplacePenalty(ref_curv, lam=1.3, prior_precision=0.2)(A64, B64)
    ref_g = torch.autograd.grad(ref, A64 + B64)
    (v_d, g_d), (v_p, g_p) = outs
    assert_close_like_torch(v_p, ref, v_d)          # packed is as close to float64 as dense is
    for a, b, r in zip(g_p, g_d, ref_g):
        assert_close_like_torch(a, r, b)


@pytest.mark.parametrize("variant", ["kfac", "tri", "wkfac", "diag"])
@pytest.mark.parametrize("layout", ["dense", "packed"])
def test_bf16_factors_halve_bytes_and_compute_in_fp32(backend, variant, layout):
    pen, v, grads, ref, ref_grads, exact = bf16_case(variant, layout, device=DEV)
    if variant != "diag":
        assert pen.arena.dtype == torch.bfloat16
    assert v.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    # only fp32 rounding on top of the bf16 storage: as close to the rounded factors in float64 as
    # PyTorch's own fp32 is ...
    assert_close_like_torch(v, ref, ref.float())
    for g, r in zip(grads, ref_grads):
        assert_close_like_torch(g, r, r.float())
    # ... and within bf16's relative precision of the unrounded curvature
    assert abs(float(v) - float(exact)) <= 1e-2 * abs(float(exact))


def test_bf16_factors_save_and_load_as_bf16(tmp_path):
    p = penalty_problem()
    curv = curvature_of(p, "tri").to(dtype=torch.bfloat16)
    curv.to_layout("packed", 8).save(tmp_path / "c.safetensors")
    back = LoRACurvature.load(tmp_path / "c.safetensors")
    assert (back.factor_dtype, back.layout) == (torch.bfloat16, "packed")
    assert all(torch.equal(back.tensors[k], t) for k, t in curv.tensors.items())
    assert back.get("A0", next(iter(back.adapters))).dtype == torch.float64      # anchors keep theirs
    A = [a.detach().float() for a in p["A"]]
    B = [b.detach().float() for b in p["B"]]
    assert torch.equal(LaplacePenalty(back, lam=1.0)(A, B), LaplacePenalty(curv, lam=1.0)(A, B))


def test_unsupported_factor_dtype_is_rejected():
    curv = curvature_of(penalty_problem(), "kfac").to(dtype=torch.float16)
    with pytest.raises(ValueError, match="float16.*curvature.to\\(dtype=torch.float32\\)"):
        LaplacePenalty(curv, lam=1.0)
