"""How the penalty's work is grouped: which adapters are stacked into one batched product.

* A side: adapters reading the same ``Sx`` form a *bundle*; their ``dA`` rows are stacked so that
  ``Sx`` is read once (``D_a = [dA_q; dA_k; dA_v]``). Bundles with the same (in_features, rank,
  members) form a *class*; every class of both sides goes into one ``grouped_gram`` call.
* B side: each ``Sg`` serves one adapter; adapters with the same (out_features, rank) form a class.
* tri's cross terms and ``wkfac`` pair an adapter's A-side result with its B-side one: both sides
  emit per-adapter ``r x r`` blocks, which are aligned through index tensors per rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .curvature import LoRACurvature
from .reference.packed import packed_numel


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
    """A-side and B-side classes for a Kronecker variant (kfac, tri, wkfac; wkfac uses both sides of
    every adapter)."""
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


@dataclass
class GramLayout:
    """Where every class's factors, stacked rows and Gram blocks live in the flat buffers of
    ``lalora::grouped_gram``, and the launch tables of its Triton kernel.

    classes: per class ``(n, R, m)`` (factor size, stacked rows per bundle, bundles), in the order
    their ``D`` and factors are concatenated. tile: 0 for dense factors (n * n numbers each), else
    the T of the tile-packed layout (``packed_numel(n, T)`` numbers each). Offsets are in elements.
    """
    classes: list[tuple[int, int, int]]
    tile: int = 0
    panel: int = 64                       # columns of S per program for dense factors (BLOCK_N);
                                          # packed factors use one tile (T columns)

    def factor_numel(self, n: int) -> int:
        return packed_numel(n, self.tile) if self.tile else n * n

    def __post_init__(self):
        self.d_off, self.s_off, self.g_off = [], [], []
        d = s = g = 0
        for n, R, m in self.classes:
            self.d_off.append(d)
            self.s_off.append(s)
            self.g_off.append(g)
            d, s, g = d + m * R * n, s + m * self.factor_numel(n), g + m * R * R
        self.d_size, self.s_size, self.g_size = d, s, g

    def flat_classes(self) -> list[int]:
        """``[n, R, m, d_off, s_off, g_off]`` per class, flattened (the op's int[] argument)."""
        return [v for c, d, s, g in zip(self.classes, self.d_off, self.s_off, self.g_off)
                for v in (*c, d, s, g)]

    @staticmethod
    def block_r(R: int) -> int:
        return 16 if R <= 16 else 32 if R <= 32 else 64

    def tables(self):
        """items ``(k, 5)`` [s_off, n, d_off, R, g_off]; work ``(w, 3)`` [item, row tile, panel] and
        pairs ``(p, 4)`` [item, row tile, first work (bucket-local), panels], both sorted by bucket;
        plan: per bucket ``[w_start, w_end, p_start, p_end, block_r, padded_cols]``."""
        items, buckets = [], {}
        for (n, R, m), d0, s0, g0 in zip(self.classes, self.d_off, self.s_off, self.g_off):
            for b in range(m):
                items.append((s0 + b * self.factor_numel(n), n, d0 + b * R * n, R, g0 + b * R * R))
                buckets.setdefault(self.block_r(R), []).append(len(items) - 1)
        work, pairs, plan = [], [], []
        for br in sorted(buckets):
            w0, p0 = len(work), len(pairs)
            cols = max(-(-items[k][3] // br) * br for k in buckets[br])
            for k in buckets[br]:
                n, R = items[k][1], items[k][3]
                panels = -(-n // (self.tile or self.panel))
                for rt in range(-(-R // br)):
                    pairs.append((k, rt, len(work) - w0, panels))
                    work.extend((k, rt, pj) for pj in range(panels))
            plan += [w0, len(work), p0, len(pairs), br, cols]
        return items, work, pairs, plan
