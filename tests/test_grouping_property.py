"""Property test: for random adapter layouts (shared inputs, mixed ranks and shapes, zero anchors),
the grouped penalty equals the per-adapter closed form, value and gradients."""
import torch
from problems import spd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lalora_kernels import fused_laplace_penalty
from lalora_kernels.reference.closed_form import finalize, penalty_closed_form


@st.composite
def layouts(draw):
    n_inputs = draw(st.integers(1, 3))
    dims = [draw(st.integers(1, 9)) for _ in range(n_inputs)]
    n = draw(st.integers(1, 6))
    adapters = [(draw(st.integers(1, 9)), draw(st.integers(0, n_inputs - 1)), draw(st.integers(1, 3)),
                 draw(st.booleans())) for _ in range(n)]          # (out, input index, rank, B* = 0)
    return dims, adapters, draw(st.sampled_from(["kfac", "tri", "wkfac", "diag"])), draw(st.integers(0, 2**16))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts())
def test_grouped_equals_closed_form(layout):
    dims, adapters, variant, seed = layout
    torch.manual_seed(seed)
    Sx = [spd(d) for d in dims]
    A0, B0, A, B, Sg, FA, FB, sx_index, caa, s = [], [], [], [], [], [], [], [], [], []
    for k, (o, j, r, zero_b) in enumerate(adapters):
        i = dims[j]
        A0.append(torch.randn(r, i, dtype=torch.float64))
        B0.append(torch.zeros(o, r, dtype=torch.float64) if zero_b else torch.randn(o, r, dtype=torch.float64))
        A.append((A0[-1] + 0.3 * torch.randn_like(A0[-1])).requires_grad_())
        B.append((B0[-1] + 0.3 * torch.randn_like(B0[-1])).requires_grad_())
        Sg.append(spd(o))
        FA.append(None if zero_b else torch.rand(r, i, dtype=torch.float64))
        FB.append(torch.rand(o, r, dtype=torch.float64))
        skip_a = variant in ("kfac", "tri") and zero_b
        sx_index.append(None if skip_a else j)
        caa.append(A0[-1] @ Sx[j] @ A0[-1].T)
        s.append(0.5 + 0.25 * k)
    value = fused_laplace_penalty(A, B, A0, B0, variant=variant, scaling=s, lam=0.7, prior_precision=0.2,
                                  Sx=Sx, sx_index=sx_index, Sg=Sg, Caa=caa if variant in ("kfac", "tri") else None,
                                  FA=FA if variant == "diag" else None, FB=FB if variant == "diag" else None)
    value.backward()
    total = 0.0
    for k, (o, j, r, zero_b) in enumerate(adapters):
        sx = None if sx_index[k] is None else Sx[j]
        fin = finalize(A0[k], B0[k], sx, Sg[k])
        fin["Caa"] = caa[k]
        v, gA, gB = penalty_closed_form(variant, A[k].detach(), B[k].detach(), A0[k], B0[k], scaling=s[k],
                                        lam=0.7, delta=0.2, Sx=sx, Sg=Sg[k], FA=FA[k], FB=FB[k], **fin)
        total = total + v
        torch.testing.assert_close(A[k].grad, gA)
        torch.testing.assert_close(B[k].grad, gB)
    torch.testing.assert_close(value, total)
