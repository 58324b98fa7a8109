"""How the penalty's work is grouped: which adapters are stacked into one batched product.

* A side: adapters reading the same ``Sx`` form a *bundle*; their ``dA`` rows are stacked so that
  ``Sx`` is read once (``D_a = [dA_q; dA_k; dA_v]``). Bundles with the same (in_features, rank,
  members) form a *class*, evaluated as one ``sym_gram`` over ``(bundles, K r, i)``.
* B side: each ``Sg`` serves one adapter; adapters with the same (out_features, rank) form a class.
* Cross terms and ``wkfac`` pair an adapter's A-side result with its B-side one: both sides emit
  per-adapter ``r x r`` blocks, which are aligned through index tensors per rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .curvature import LoRACurvature


@dataclass
class SideClass:
    """Adapters of one side evaluated together; ``names`` in stacking order, ``bundles x per``."""
    dim: int                       # i for the A side, o for the B side
    rank: int
    per: int                       # adapters per bundle (1 on the B side)
    factor_keys: list[str]         # one factor per bundle
    names: list[str] = field(default_factory=list)


def _side_classes(curv: LoRACurvature, use_a: dict[str, bool], use_b: dict[str, bool]):
    bundles: dict[tuple[str, int], list[str]] = {}
    for name, a in curv.adapters.items():
        if use_a[name]:
            bundles.setdefault((a.sx_key, a.rank), []).append(name)
    a_classes: dict[tuple, SideClass] = {}
    for (key, rank), members in bundles.items():
        info = curv.adapters[members[0]]
        c = a_classes.setdefault((info.in_features, rank, len(members)),
                                 SideClass(info.in_features, rank, len(members), []))
        c.factor_keys.append(f"Sx/{key}")
        c.names.extend(members)
    b_classes: dict[tuple, SideClass] = {}
    for name, a in curv.adapters.items():
        if use_b[name]:
            c = b_classes.setdefault((a.out_features, a.rank), SideClass(a.out_features, a.rank, 1, []))
            c.factor_keys.append(f"Sg/{name}")
            c.names.append(name)
    return list(a_classes.values()), list(b_classes.values())


def plan_sides(curv: LoRACurvature) -> tuple[list[SideClass], list[SideClass]]:
    """A-side and B-side classes for a Kronecker variant (kfac, tri, wkfac)."""
    full = curv.variant == "wkfac"
    use_a = {n: full or a.has_sx for n, a in curv.adapters.items()}
    use_b = {n: full or a.has_sg for n, a in curv.adapters.items()}
    return _side_classes(curv, use_a, use_b)


def side_order(classes: list[SideClass]) -> dict[int, list[str]]:
    """Per rank, the adapter names in the order their blocks come out of the side's classes."""
    out: dict[int, list[str]] = {}
    for c in classes:
        out.setdefault(c.rank, []).extend(c.names)
    return out
