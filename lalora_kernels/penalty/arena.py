"""How a curvature is laid out for the grouped penalty: which adapters are stacked into one product,
the flat factor arena, and the per-class constants (anchors, ``Ka``/``Kb``, the pairing of each
adapter's A-side and B-side blocks).

* A side: adapters reading the same ``Sx`` form a *bundle*; their ``dA`` rows are stacked so that
  ``Sx`` is read once (``D_a = [dA_q; dA_k; dA_v]``). Bundles with the same (in_features, rank,
  members) form a *class*.
* B side: each ``Sg`` serves one adapter; adapters with the same (out_features, rank) form a class.
* Both sides' classes go into one class table (``gram_meta``), so one ``grouped_gram`` call reads
  every factor of the model.
* tri's cross terms and ``wkfac`` pair an adapter's A-side result with its B-side one: both sides
  emit per-adapter ``r x r`` blocks, aligned through index tensors per rank (``RankPairs``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Iterator, Optional

import torch
from torch import Tensor

from ..curvature import LoRACurvature
from ..gram_meta import GramMeta


@dataclass
class SideClass:
    """Adapters of one side evaluated together; ``names`` in stacking order, ``bundles x per``.
    ``anchor``: their A* (m, r, i) or B* (m, o, r); ``K``: tri/wkfac's Ka (m, r, i) or Kb (m, o, r)."""
    side: str                      # "A" or "B"
    dim: int                       # i for the A side, o for the B side
    rank: int
    per: int                       # adapters per bundle (1 on the B side)
    factor_keys: list[str]         # one factor per bundle
    names: list[str] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)   # each name's index in the curvature's order
    anchor: Optional[Tensor] = None
    K: Optional[Tensor] = None


@dataclass
class RankPairs:
    """Adapters of one rank with both an A-side and a B-side block, and where their blocks are:
    ``ia``/``ib`` index the rank's blocks in side order; ``ga``/``gb`` (wkfac) are the flat indices of
    their diagonal blocks in G; ``Caa``/``Cbb`` (wkfac) their anchor Grams; ``coef`` = lam s^2 / c."""
    rank: int
    ia: Tensor
    ib: Tensor
    coef: Tensor
    ga: Optional[Tensor] = None
    gb: Optional[Tensor] = None
    Caa: Optional[Tensor] = None
    Cbb: Optional[Tensor] = None


@dataclass
class DiagClass:
    """Same-shaped ``FA`` (side A) or ``FB`` (side B) of several adapters, stacked: ``F`` already
    scaled by each adapter's coefficient, ``anchor`` their A* or B*."""
    side: str
    positions: list[int]
    F: Tensor
    anchor: Tensor


def tensors_of(obj) -> Iterator[tuple[str, Tensor]]:
    """(field name, tensor) of every tensor field of a dataclass instance."""
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, Tensor):
            yield f.name, v


def side_classes(curv: LoRACurvature) -> tuple[list[SideClass], list[SideClass]]:
    """A-side and B-side classes for a Kronecker variant (kfac, tri, wkfac; wkfac uses both sides of
    every adapter, kfac/tri only the blocks SPEC section 5 does not prove zero). Low-rank factors
    also group by their k."""
    full = curv.variant == "wkfac"
    pos = {n: k for k, n in enumerate(curv.adapters)}

    def k_of(key: str) -> int:
        return curv.tensors[key].shape[1] if curv.is_lowrank(key) else 0
    bundles: dict[tuple[str, int], list[str]] = {}
    for name, a in curv.adapters.items():
        if full or a.has_sx:
            bundles.setdefault((a.sx_key, a.rank), []).append(name)
    a_classes: dict[tuple, SideClass] = {}
    for (key, rank), members in bundles.items():
        info = curv.adapters[members[0]]
        c = a_classes.setdefault((info.in_features, rank, len(members), k_of(f"Sx/{key}")),
                                 SideClass("A", info.in_features, rank, len(members), []))
        c.factor_keys.append(f"Sx/{key}")
        c.names.extend(members)
    b_classes: dict[tuple, SideClass] = {}
    for name, a in curv.adapters.items():
        if full or a.has_sg:
            c = b_classes.setdefault((a.out_features, a.rank, k_of(f"Sg/{name}")),
                                     SideClass("B", a.out_features, a.rank, 1, []))
            c.factor_keys.append(f"Sg/{name}")
            c.names.append(name)
    out = list(a_classes.values()), list(b_classes.values())
    for c in out[0] + out[1]:
        c.positions = [pos[n] for n in c.names]
    return out


def gram_meta(classes: list[SideClass], tile: int, curv: Optional[LoRACurvature] = None
              ) -> tuple[GramMeta, list[int]]:
    """The class table of the sides' classes, in order: (n, R = per * rank, bundles), and for
    low-rank factors (``curv`` given and low-rank) the ``[k, e_off]`` of each class."""
    shapes = [(c.dim, c.per * c.rank, len(c.factor_keys)) for c in classes]
    if curv is None or curv.layout != "lowrank":
        return GramMeta.build(shapes, tile), []
    ks = [curv.tensors[c.factor_keys[0]].shape[1] for c in classes]
    meta = GramMeta.build(shapes, 0, sizes=[n * k for (n, _, _), k in zip(shapes, ks)])
    ranks, e = [], 0
    for (_, _, m), k in zip(shapes, ks):
        ranks += [k, e]
        e += m * (k + 1)
    return meta, ranks


def adopt(curv: LoRACurvature, keys: list[str]) -> Tensor:
    """Copy the tensors ``keys`` into one flat arena, in that order, and point the curvature at views
    of it, so that the factors are not held twice (originals are freed one by one)."""
    first = curv.tensors[keys[0]]
    arena = torch.empty(sum(curv.tensors[k].numel() for k in keys), dtype=first.dtype, device=first.device)
    off = 0
    for k in keys:
        t = curv.tensors[k]
        view = arena[off:off + t.numel()].view(t.shape)
        view.copy_(t)
        curv.tensors[k] = view
        off += t.numel()
    return arena


def diagonal_blocks(classes: list[SideClass], meta: GramMeta) -> dict[tuple[str, str], Tensor]:
    """(side, adapter name) -> flat indices into G of the adapter's (r, r) diagonal block."""
    blocks = {}
    for c, row in zip(classes, meta.rows):
        r, R = c.rank, c.per * c.rank
        square = torch.arange(r)[:, None] * R + torch.arange(r)
        for k, n in enumerate(c.names):
            b, p = divmod(k, c.per)
            blocks[c.side, n] = row.g_off + b * R * R + p * r * (R + 1) + square
    return blocks


def side_order(classes: list[SideClass]) -> dict[int, list[str]]:
    """Per rank, the adapter names in the order their blocks come out of the side's classes."""
    out: dict[int, list[str]] = {}
    for c in classes:
        out.setdefault(c.rank, []).extend(c.names)
    return out


def rank_pairs(a_classes: list[SideClass], b_classes: list[SideClass], coef: dict[str, float], dtype,
               blocks: Optional[dict] = None, anchor_G: Optional[Tensor] = None) -> list[RankPairs]:
    """Per rank, the pairing of each adapter's A-side and B-side r x r blocks (tri's cross term,
    wkfac); with ``blocks`` and ``anchor_G`` (wkfac) also their diagonal blocks and anchor Grams."""
    out = []
    a_order, b_order = side_order(a_classes), side_order(b_classes)
    for r in sorted(set(a_order) & set(b_order)):
        in_b = set(b_order[r])
        both = [n for n in a_order[r] if n in in_b]
        if not both:
            continue
        pair = RankPairs(r, torch.tensor([a_order[r].index(n) for n in both]),
                         torch.tensor([b_order[r].index(n) for n in both]),
                         torch.tensor([coef[n] for n in both], dtype=dtype))
        if blocks is not None:
            pair.ga = torch.stack([blocks["A", n] for n in both]).reshape(-1)
            pair.gb = torch.stack([blocks["B", n] for n in both]).reshape(-1)
            pair.Caa, pair.Cbb = anchor_G[pair.ga.to(anchor_G.device)], anchor_G[pair.gb.to(anchor_G.device)]
        out.append(pair)
    return out
