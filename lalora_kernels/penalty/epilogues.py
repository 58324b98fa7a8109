"""Each variant's penalty from the grouped products, as small pure functions (SPEC section 4).

Notation per adapter: ``dA = A - A*`` (r x i), ``dB = B - B*`` (o x r), ``coef = lam s^2 / c``;
``Gda = dA Sx dA^T`` and ``Gdb = dB^T Sg dB`` are its diagonal blocks of ``grouped_gram``'s G;
``Z_a = dA Ka^T`` and ``Z_b = dB^T Kb`` (r x r) with ``Ka = A* Sx``, ``Kb = Sg B*``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .arena import RankPairs, SideClass


def quad_weights(blocks: dict, curv, coef: dict[str, float], g_size: int, dtype, device) -> Tensor:
    """``kfac`` (and ``tri``'s diagonal blocks) as weights C on G, for ``grouped_gram_quad``:

        R = 1/2 <C, G>,   C = coef * Cbb on an adapter's A-side block, coef * Caa on its B-side block

    i.e. ``1/2 coef (<Cbb, Gda> + <Caa, Gdb>)``, the K-FAC blocks ``Sx (x) G_A`` and ``A_B (x) G_B``."""
    C = torch.zeros(g_size, dtype=dtype, device=device)
    for (side, n), idx in blocks.items():
        C[idx.to(device)] = coef[n] * curv.get("Cbb" if side == "A" else "Caa", n).to(dtype)
    return C


def z_blocks(a_classes: list[SideClass], b_classes: list[SideClass], dA: list[Tensor], dB: list[Tensor]
             ) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """Per rank, ``Z_a = dA Ka^T`` and ``Z_b = dB^T Kb`` of every adapter in side order, (adapters, r, r)."""
    za: dict[int, list[Tensor]] = {}
    zb: dict[int, list[Tensor]] = {}
    for c, d in zip(a_classes, dA):
        za.setdefault(c.rank, []).append(d @ c.K.transpose(1, 2))
    for c, d in zip(b_classes, dB):
        zb.setdefault(c.rank, []).append(d.transpose(1, 2) @ c.K)
    return {r: torch.cat(z) for r, z in za.items()}, {r: torch.cat(z) for r, z in zb.items()}


def tri_cross(pairs: list[RankPairs], za: dict[int, Tensor], zb: dict[int, Tensor], zero: Tensor) -> Tensor:
    """``tri``'s cross blocks: ``R_cross = coef <dA, Kb^T dB Ka> = coef tr(Z_a Z_b)`` per adapter."""
    value = zero
    for p in pairs:
        Xa, Xb = za[p.rank].index_select(0, p.ia), zb[p.rank].index_select(0, p.ib)
        value = value + (p.coef * (Xa * Xb.transpose(1, 2)).sum((1, 2))).sum()
    return value


def wkfac(pairs: list[RankPairs], G: Tensor, za: dict[int, Tensor], zb: dict[int, Tensor], zero: Tensor) -> Tensor:
    """``wkfac`` from the kfac products alone (SPEC section 4, project note), per adapter with
    ``X = Z_a^T`` and ``Y = Z_b``:

        R / coef = 1/2 <A Sx A^T, Gdb> + <A Sx dA^T, Y> + 1/2 <Gda, Cbb>,
        A Sx dA^T = X + Gda,   A Sx A^T = Caa + X + X^T + Gda,

    i.e. ``1/2 <V Sx V^T, U^T Sg U>`` with ``U = [dB, B*]``, ``V = [A; dA]``, where the blocks that
    involve only anchors are the constants ``Caa``, ``Cbb``, ``Ka``, ``Kb``."""
    value = zero
    for p in pairs:
        r = p.rank
        X = za[r].index_select(0, p.ia).transpose(1, 2)
        Y = zb[r].index_select(0, p.ib)
        Gda, Gdb = G[p.ga].view(-1, r, r), G[p.gb].view(-1, r, r)
        AdA = X + Gda
        AA = p.Caa.view(-1, r, r) + AdA + X.transpose(1, 2)
        per = 0.5 * (AA * Gdb).sum((1, 2)) + (AdA * Y).sum((1, 2)) + 0.5 * (Gda * p.Cbb.view(-1, r, r)).sum((1, 2))
        value = value + (p.coef * per).sum()
    return value
