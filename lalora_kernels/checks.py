"""The input check of every ``lalora::`` op, one function per op, named after it (``ops.run`` calls it
before any kernel, whatever the backend).

The ops are public: other front ends call ``torch.ops.lalora.*`` with their own tables. So nothing
reaches memory unchecked: every size and offset is a non-negative integer, every range it implies
lies inside its buffer (Python integers: no overflow), output ranges do not overlap, dtypes and
devices are what the schema says. Every error names the argument and says what it must be.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .gram_meta import CLASS_FIELDS, ClassField, factor_numel, gram_numel
from .reference.packed_format import MAX_TILE, packed_numel

ACCUMULATORS = (torch.float32, torch.float64)
ARENAS = (torch.float32, torch.float64, torch.bfloat16)


def _float(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got "
                        f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")


def _dtype(name: str, t: Tensor, allowed) -> None:
    _float(name, t)
    if t.dtype not in allowed:
        raise TypeError(f"{name} is {t.dtype}; it must be one of {', '.join(str(d)[6:] for d in allowed)}")


def _device(ref_name: str, ref: Tensor, **others: Optional[Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; put them on one device")


def _weight(weight) -> None:
    if not math.isfinite(weight):
        raise ValueError(f"weight={weight!r} must be finite")


def _rows(name: str, X: Tensor, n: int) -> int:
    """X is (..., n) with n the accumulator's size; returns its number of rows."""
    if X.dim() < 1 or X.shape[-1] != n:
        raise ValueError(f"{name} has shape {tuple(X.shape)}; its last dimension must be {n} (the accumulator's)")
    return X.numel() // n if n else 0


def _mask(mask: Optional[Tensor], X: Tensor) -> None:
    if mask is None:
        return
    if tuple(mask.shape) != tuple(X.shape[:-1]):
        raise ValueError(f"mask has shape {tuple(mask.shape)}; it must be X's leading shape {tuple(X.shape[:-1])} "
                         "(one entry per token row)")
    _device("X", X, mask=mask)


def _tile(tile, *, allow_dense: bool) -> None:
    ok = isinstance(tile, int) and not isinstance(tile, bool) and (
        (allow_dense and tile == 0) or (1 <= tile <= MAX_TILE and tile & (tile - 1) == 0))
    if not ok:
        raise ValueError(f"tile={tile!r} must be {'0 (dense factors) or ' if allow_dense else ''}a power of two "
                         f"from 1 to {MAX_TILE} (the packed layout's T)")


def cov_update_(S: Tensor, X: Tensor, mask: Optional[Tensor], weight: float) -> None:
    _dtype("S", S, ACCUMULATORS)
    _float("X", X)
    if S.dim() != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"S has shape {tuple(S.shape)}; it must be a square (n, n) accumulator")
    _rows("X", X, S.shape[0])
    _mask(mask, X)
    _device("S", S, X=X)
    _weight(weight)


def sqcov_update_(F: Tensor, G: Tensor, X: Tensor, mask: Optional[Tensor], weight: float) -> None:
    _dtype("F", F, ACCUMULATORS)
    _float("G", G)
    _float("X", X)
    if F.dim() != 2:
        raise ValueError(f"F has shape {tuple(F.shape)}; it must be a (p, q) accumulator")
    _rows("G", G, F.shape[0])
    _rows("X", X, F.shape[1])
    if tuple(G.shape[:-1]) != tuple(X.shape[:-1]):
        raise ValueError(f"G {tuple(G.shape)} and X {tuple(X.shape)} must have the same leading shape (the same tokens)")
    _mask(mask, X)
    _device("F", F, G=G, X=X)
    _weight(weight)


def packed_cov_update_(P: Tensor, X: Tensor, mask: Optional[Tensor], weight: float, tile: int) -> None:
    _tile(tile, allow_dense=False)
    _dtype("P", P, ACCUMULATORS)
    _float("X", X)
    if X.dim() < 1 or X.shape[-1] < 1:
        raise ValueError(f"X has shape {tuple(X.shape)}; it must be (..., n) with n >= 1")
    want = packed_numel(X.shape[-1], tile)
    if P.dim() != 1 or P.numel() != want or not P.is_contiguous():
        raise ValueError(f"P has shape {tuple(P.shape)}; a packed factor of n={X.shape[-1]}, tile={tile} is a "
                         f"contiguous 1-D tensor of {want} numbers")
    _mask(mask, X)
    _device("P", P, X=X)
    _weight(weight)


def classes_table(classes: Sequence[int], tile: int, d_numel: int, s_numel: int, ranks: Sequence[int] = ()) -> None:
    """The class table (``gram_meta``): fields non-negative integers, n >= 1 and R >= 1, every
    bundle's rows inside D and factor inside the arena, no two classes' rows (so Q and dD) or Gram
    blocks overlapping."""
    if len(classes) % CLASS_FIELDS:
        raise ValueError(f"classes has {len(classes)} numbers; it must hold {CLASS_FIELDS} per class "
                         f"({', '.join(f.name for f in ClassField)})")
    d_ranges, g_ranges = [], []
    for c in range(0, len(classes), CLASS_FIELDS):
        row = classes[c:c + CLASS_FIELDS]
        k = c // CLASS_FIELDS
        for field, v in zip(ClassField, row):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"classes: class {k} has {field.name}={v!r}; every field must be an integer >= 0")
        n, R, m, d_off, s_off, g_off = row
        if n < 1 or R < 1:
            raise ValueError(f"classes: class {k} has n={n}, R={R}; both must be >= 1 (m=0 gives an empty class)")
        if d_off + m * R * n > d_numel:
            raise ValueError(f"classes: class {k} reads D[{d_off}:{d_off + m * R * n}] but D has {d_numel} numbers")
        size = n * ranks[2 * k] if ranks else factor_numel(n, tile)
        if s_off + m * size > s_numel:
            raise ValueError(f"classes: class {k} reads arena[{s_off}:{s_off + m * size}] ({m} factors of n={n}, "
                             f"{f'rank {ranks[2 * k]}' if ranks else f'tile={tile}'}) but the arena has {s_numel} numbers")
        if m:
            d_ranges.append((d_off, d_off + m * R * n, k))
            g_ranges.append((g_off, g_off + m * R * R, k))
    for what, ranges in (("rows of D", d_ranges), ("Gram blocks", g_ranges)):
        ranges.sort()
        for (lo0, hi0, k0), (lo1, hi1, k1) in zip(ranges, ranges[1:]):
            if lo1 < hi0:
                raise ValueError(f"classes: the {what} of classes {k0} and {k1} overlap ([{lo0}, {hi0}) and "
                                 f"[{lo1}, {hi1})); every class needs its own range")


def grouped_gram(D: Tensor, arena: Tensor, classes: Sequence[int], tile: int) -> None:
    _tile(tile, allow_dense=True)
    _float("D", D)
    _dtype("arena", arena, ARENAS)
    for name, t in (("D", D), ("arena", arena)):
        if t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"{name} has shape {tuple(t.shape)}; it must be a contiguous 1-D (flat) buffer")
    _device("arena", arena, D=D)
    classes_table(classes, tile, D.numel(), arena.numel())


def grouped_gram_quad(D: Tensor, arena: Tensor, classes: Sequence[int], tile: int, C: Tensor, grad: bool) -> None:
    grouped_gram(D, arena, classes, tile)
    _float("C", C)
    want = gram_numel(classes)
    if C.dim() != 1 or C.numel() != want:
        raise ValueError(f"C has shape {tuple(C.shape)}; it must be 1-D with {want} numbers (one per entry of G)")
    _device("arena", arena, C=C)
    if not isinstance(grad, bool):
        raise TypeError(f"grad={grad!r} must be a bool")


def diag_quad(F: Tensor, D: Tensor) -> None:
    _dtype("F", F, ACCUMULATORS)
    _float("D", D)
    if F.shape != D.shape:
        raise ValueError(f"F {tuple(F.shape)} and D {tuple(D.shape)} must have the same shape")
    _device("F", F, D=D)


def grouped_gram_lowrank(D: Tensor, U: Tensor, E: Tensor, classes: Sequence[int], ranks: Sequence[int]) -> None:
    _float("D", D)
    _dtype("U", U, ARENAS)
    _dtype("E", E, ACCUMULATORS)
    for name, t in (("D", D), ("U", U), ("E", E)):
        if t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"{name} has shape {tuple(t.shape)}; it must be a contiguous 1-D (flat) buffer")
    _device("U", U, D=D, E=E)
    n_classes = len(classes) // CLASS_FIELDS if len(classes) % CLASS_FIELDS == 0 else -1
    if len(ranks) != 2 * n_classes:
        raise ValueError(f"ranks has {len(ranks)} numbers; it must hold [k, e_off] for each of the "
                         f"{max(n_classes, 0)} classes")
    for j in range(n_classes):
        k, e_off = ranks[2 * j], ranks[2 * j + 1]
        n, m = classes[CLASS_FIELDS * j], classes[CLASS_FIELDS * j + 2]
        for name, v in (("k", k), ("e_off", e_off)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"ranks: class {j} has {name}={v!r}; it must be an integer >= 0")
        if not 1 <= k <= max(n, 1):
            raise ValueError(f"ranks: class {j} has k={k}; it must be from 1 to n={n}")
        if isinstance(m, int) and m >= 0 and e_off + m * (k + 1) > E.numel():
            raise ValueError(f"ranks: class {j} reads E[{e_off}:{e_off + m * (k + 1)}] but E has {E.numel()} numbers")
    classes_table(classes, 0, D.numel(), U.numel(), ranks)
