"""Per-adapter penalty value and closed-form gradients, written exactly as SPEC section 4 states them.

This is the readable oracle: one adapter at a time, no grouping, any dtype (float64 in tests).
The fast path (``lalora_kernels.penalty``) must agree with it, and it must agree with the dense
quadratic form built from materialised Kronecker blocks (tests do both).
"""
from __future__ import annotations

from typing import Optional

import torch

from .packed_format import mirror_upper

Tensor = torch.Tensor


def finalize(A0: Tensor, B0: Tensor, Sx: Optional[Tensor], Sg: Optional[Tensor]) -> dict[str, Tensor]:
    """SPEC section 3: Ka = A* Sx, Caa = A* Sx A*^T, Kb = Sg B*, Cbb = B*^T Sg B* (what exists).
    Caa and Cbb are exactly symmetric (mirrored from their upper triangles)."""
    out: dict[str, Tensor] = {}
    if Sx is not None:
        A0 = A0.to(Sx.dtype)
        out["Ka"] = A0 @ Sx
        out["Caa"] = mirror_upper(out["Ka"] @ A0.T)
    if Sg is not None:
        B0 = B0.to(Sg.dtype)
        out["Kb"] = Sg @ B0
        out["Cbb"] = mirror_upper(B0.T @ out["Kb"])
    return out


def _prior(dA: Tensor, dB: Tensor, delta: float) -> Tensor:
    return 0.5 * delta * (dA.square().sum() + dB.square().sum())


def penalty_closed_form(variant: str, A: Tensor, B: Tensor, A0: Tensor, B0: Tensor, *,
                        scaling: float, lam: float, delta: float = 0.0,
                        Sx: Optional[Tensor] = None, Sg: Optional[Tensor] = None,
                        Caa: Optional[Tensor] = None, Cbb: Optional[Tensor] = None,
                        Ka: Optional[Tensor] = None, Kb: Optional[Tensor] = None,
                        FA: Optional[Tensor] = None, FB: Optional[Tensor] = None,
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """R = lam * R_F + delta/2 ||dtheta||^2 for one adapter, with grad_A and grad_B.

    A: (r, i), B: (o, r), anchors alike; Sx: (i, i), Sg: (o, o), Caa/Cbb: (r, r), Ka: (r, i),
    Kb: (o, r), FA: (r, i), FB: (o, r). A factor that is None contributes nothing: this is how a
    provably-zero block (SPEC section 5) is expressed.
    """
    dA, dB = A - A0, B - B0
    zero = dA.new_zeros(())
    gA, gB = torch.zeros_like(dA), torch.zeros_like(dB)
    c = lam * scaling ** 2
    if variant in ("kfac", "tri"):
        value = zero
        if Sg is not None and Caa is not None:       # B block: A_B (x) G_B
            P_g = Sg @ dB
            value = value + 0.5 * c * (P_g * (dB @ Caa)).sum()
            gB = gB + c * P_g @ Caa
        if Sx is not None and Cbb is not None:       # A block: Sx (x) G_A
            Q_x = dA @ Sx
            value = value + 0.5 * c * ((Cbb @ dA) * Q_x).sum()
            gA = gA + c * Cbb @ Q_x
        if variant == "tri" and Ka is not None and Kb is not None:   # cross blocks
            value = value + c * (dA * (Kb.T @ dB @ Ka)).sum()
            gB = gB + c * Kb @ dA @ Ka.T
            gA = gA + c * Kb.T @ dB @ Ka
    elif variant == "wkfac":
        dW = dB @ A + B0 @ dA          # = B A - B* A*, without cancellation near the anchor
        SgdWSx = Sg @ dW @ Sx
        value = 0.5 * c * (dW * SgdWSx).sum()
        gB = c * SgdWSx @ A.T
        gA = c * B.T @ SgdWSx
    elif variant == "diag":
        value = zero
        if FA is not None:
            value = value + 0.5 * lam * (FA * dA.square()).sum()
            gA = gA + lam * FA * dA
        if FB is not None:
            value = value + 0.5 * lam * (FB * dB.square()).sum()
            gB = gB + lam * FB * dB
    else:
        raise ValueError(f"variant={variant!r} is unknown; use one of 'diag', 'kfac', 'tri', 'wkfac'")
    return value + _prior(dA, dB, delta), gA + delta * dA, gB + delta * dB
