"""The launch metadata of ``lalora::grouped_gram`` and ``lalora::grouped_gram_quad``, with named fields.

Words (docs/glossary.md): a *bundle* is the rows ``D`` (R x n) that share one symmetric factor S
(n x n); a *class* is ``m`` bundles of the same (n, R) laid out one after another; the op's
``classes`` argument is the class table, flattened, ``CLASS_FIELDS`` numbers per class:

    n      factor size                        d_off  where the class's D starts in the flat D
    R      stacked rows per bundle            s_off  where its factors start in the flat arena
    m      bundles in the class               g_off  where its Gram blocks start in the flat G

Bundle b of a class reads ``D[d_off + b R n :][: R n]`` (row-major R x n), its factor at
``arena[s_off + b f :][: f]`` with ``f = factor_numel(n, tile)`` (n^2 dense, or the packed size of
``reference.packed_format``), and writes ``G[g_off + b R R :][: R R]``. Every backend reads the same
table; C++ (``csrc/gram_classes.h``) and Triton (the ``items`` table below) name the fields in the
same order.

Worked example: the A side of one Llama layer with LoRA r = 8 on q, k, v (one shared ``Sx``, n =
2048, so one bundle of R = 24 rows) and o (its own ``Sx``, one bundle of R = 8), dense factors::

    GramMeta.build([(2048, 24, 1), (2048, 8, 1)], tile=0).classes
    == [2048, 24, 1,     0,       0,   0,
        2048,  8, 1, 49152, 4194304, 576]

The Triton kernels launch from tables derived here (``triton_tables``): an *item* is one bundle (a
class row with m = 1, same field order); a *bucket* is the items that share a row-tile size
(``BLOCK_R`` 16, 32 or 64), launched together; a *work* entry is one program (item, row tile,
column block of S); a *pair* is one (item, row tile) whose column blocks' Gram shares are summed.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache
from typing import Optional, Sequence

import torch

from .reference.packed_format import packed_numel


class ClassField(IntEnum):
    """Column of each field in a class row (and in a Triton item row)."""
    n = 0
    R = 1
    m = 2
    d_off = 3
    s_off = 4
    g_off = 5


CLASS_FIELDS = len(ClassField)
WORK_FIELDS = ("item", "row_tile", "col_block")
PAIR_FIELDS = ("item", "row_tile", "first_work", "col_blocks")
BUCKET_FIELDS = ("w_start", "w_end", "p_start", "p_end", "block_r", "cols")
DENSE_PANEL = 64          # columns of S per Triton program for dense factors; packed ones use one tile


def factor_numel(n: int, tile: int) -> int:
    """Numbers one n x n factor takes in the arena: n^2 dense (tile 0), else its packed size."""
    return packed_numel(n, tile) if tile else n * n


def block_r(R: int) -> int:
    """The Triton row-tile size for a bundle of R rows."""
    return 16 if R <= 16 else 32 if R <= 32 else 64


@dataclass(frozen=True)
class GramClass:
    n: int
    R: int
    m: int
    d_off: int
    s_off: int
    g_off: int


def read_classes(classes: Sequence[int]) -> list[GramClass]:
    """The flat class table as named rows."""
    return [GramClass(*classes[c:c + CLASS_FIELDS]) for c in range(0, len(classes), CLASS_FIELDS)]


@dataclass(frozen=True)
class GramMeta:
    """Where every class's rows, factors and Gram blocks live in the flat buffers."""
    rows: tuple[GramClass, ...]
    tile: int

    @classmethod
    def build(cls, shapes: Sequence[tuple[int, int, int]], tile: int = 0,
              sizes: Optional[Sequence[int]] = None) -> "GramMeta":
        """Classes ``(n, R, m)`` laid out in the given order, offsets packed without gaps; ``sizes``:
        the numbers one factor of each class takes, when not ``factor_numel(n, tile)`` (low rank: n k)."""
        rows, d, s, g = [], 0, 0, 0
        for j, (n, R, m) in enumerate(shapes):
            rows.append(GramClass(n, R, m, d, s, g))
            size = sizes[j] if sizes is not None else factor_numel(n, tile)
            d, s, g = d + m * R * n, s + m * size, g + m * R * R
        return cls(tuple(rows), tile)

    @property
    def classes(self) -> list[int]:
        """The op's ``classes`` argument."""
        return [v for r in self.rows for v in (r.n, r.R, r.m, r.d_off, r.s_off, r.g_off)]

    @property
    def d_size(self) -> int:
        return sum(r.m * r.R * r.n for r in self.rows)

    @property
    def s_size(self) -> int:
        return sum(r.m * factor_numel(r.n, self.tile) for r in self.rows)

    @property
    def g_size(self) -> int:
        return sum(r.m * r.R * r.R for r in self.rows)


def gram_numel(classes: Sequence[int]) -> int:
    """Numbers in the flat G of a class table (the end of its last Gram block)."""
    return max((r.g_off + r.m * r.R * r.R for r in read_classes(classes)), default=0)


@dataclass(frozen=True)
class TritonTables:
    """The Triton launch tables of one class table (fields: module docstring)."""
    items: torch.Tensor        # (k, CLASS_FIELDS) int64, one row per bundle, m = 1
    work: torch.Tensor         # (w, 3) int64, WORK_FIELDS, sorted by bucket
    pairs: torch.Tensor        # (p, 4) int64, PAIR_FIELDS, sorted by bucket
    buckets: tuple[int, ...]   # BUCKET_FIELDS per bucket, flattened


@lru_cache(maxsize=64)
def triton_tables(classes: tuple[int, ...], tile: int, device: str) -> TritonTables:
    """Built once per (class table, tile, device): a penalty calls with the same table every step."""
    items, by_block = [], {}
    for r in read_classes(classes):
        for b in range(r.m):
            items.append((r.n, r.R, 1, r.d_off + b * r.R * r.n, r.s_off + b * factor_numel(r.n, tile),
                          r.g_off + b * r.R * r.R))
            by_block.setdefault(block_r(r.R), []).append(len(items) - 1)
    work, pairs, buckets = [], [], []
    for br in sorted(by_block):
        w0, p0 = len(work), len(pairs)
        cols = max(-(-items[k][ClassField.R] // br) * br for k in by_block[br])
        for k in by_block[br]:
            n, R = items[k][ClassField.n], items[k][ClassField.R]
            blocks = -(-n // (tile or DENSE_PANEL))
            for rt in range(-(-R // br)):
                pairs.append((k, rt, len(work) - w0, blocks))
                work.extend((k, rt, j) for j in range(blocks))
        buckets += [w0, len(work), p0, len(pairs), br, cols]

    def table(rows, width):
        return torch.tensor(rows, dtype=torch.int64).reshape(-1, width).to(device)
    return TritonTables(table(items, CLASS_FIELDS), table(work, len(WORK_FIELDS)), table(pairs, len(PAIR_FIELDS)),
                        tuple(buckets))
