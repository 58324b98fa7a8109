"""Low-rank-plus-tail curvature (``storage=LowRank(...)``) without ever holding every factor at once.

Two captures, chosen by ``LowRank.capture``:

* ``"exact"``: the layers are split into chunks whose factor accumulators fit ``budget`` bytes (a
  layer group sharing an input stays together); one proxy pass per chunk accumulates that chunk's
  exact factors (tile-packed where packed kernels run), which are then eigendecomposed, cut to
  their top-k eigenpairs plus the tail, and freed. Passes: one per chunk; the batches must be
  re-iterable (a list or a DataLoader).
* ``"sketch"``: one pass accumulates, for every big factor, the sketch ``Y = S Omega`` (n x
  (k + oversample), ``Omega`` a fixed Gaussian per factor, the same on every rank) and its exact
  trace, ``O(T n l)`` work instead of ``O(T n^2)``; the factor is then recovered by a stabilised
  Nystrom approximation. Needs ``(k + oversample)`` columns per factor to fit ``budget``.

The small factors (``Caa``, ``Cbb``, ``Ka``, ``Kb``) stay exact either way; only the products of the
penalty with ``Sx`` and ``Sg`` see the compression (SPEC section 8).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import torch

from .reference import lowrank_format
from .reference.packed_format import packed_numel

DEFAULT_RANK = 256


@dataclass(frozen=True)
class LowRank:
    """``estimate_curvature(..., storage=LowRank(rank=256))``: keep each ``Sx``/``Sg`` as its top
    ``rank`` eigenpairs plus a tail that keeps the trace exactly (or as many as hold ``energy`` of the
    trace); capture ``"exact"`` (chunked, eigendecomposed) or ``"sketch"`` (one pass, Nystrom); at
    most ``budget`` bytes of factor accumulators at once (None: no limit); ``oversample`` extra
    sketch columns."""
    rank: Optional[int] = None
    energy: Optional[float] = None
    capture: str = "exact"
    budget: Optional[int] = None
    oversample: int = 16
    seed: int = 0

    def __post_init__(self):
        if self.rank is None and self.energy is None:
            object.__setattr__(self, "rank", DEFAULT_RANK)
        lowrank_format.choose_k(torch.ones(1), 1.0, self.rank, self.energy, 1)     # checks the pair
        if self.capture not in ("exact", "sketch"):
            raise ValueError(f"capture={self.capture!r} is unknown; use 'exact' or 'sketch'")
        if self.budget is not None and (not isinstance(self.budget, int) or self.budget < 1):
            raise ValueError(f"budget={self.budget!r} must be a positive number of bytes or None")
        if self.capture == "sketch" and self.rank is None:
            raise ValueError("capture='sketch' needs rank= (the sketch's width); energy= picks within it "
                             "only with capture='exact'")

    def sketch_width(self, n: int) -> int:
        return min(n, self.rank + self.oversample)


def omega(key: str, n: int, width: int, seed: int, dtype, device) -> torch.Tensor:
    """The sketch's test matrix of one factor: Gaussian, from a seed of the factor's name, so that
    every rank and every batch draws the same one (on the device, never stored)."""
    digest = int(hashlib.sha256(f"{seed}/{key}".encode()).hexdigest()[:15], 16)
    g = torch.Generator(device=device).manual_seed(digest)
    return torch.randn(n, width, generator=g, dtype=dtype, device=device)


def accumulator_bytes(n: int, tile: int, itemsize: int, lowrank: Optional[LowRank]) -> int:
    """Bytes one factor's accumulator takes during capture."""
    if lowrank is not None and lowrank.capture == "sketch":
        return n * lowrank.sketch_width(n) * itemsize               # Y (Omega is drawn again at each use)
    return (packed_numel(n, tile) if tile else n * n) * itemsize


def chunks(units: list[tuple[list[str], int]], budget: Optional[int]) -> list[list[str]]:
    """Layer groups (names, accumulator bytes) packed in order into chunks of at most ``budget`` bytes."""
    out, cur, used = [], [], 0
    for names, nbytes in units:
        if budget is not None and nbytes > budget:
            raise ValueError(f"the factors of {names[:3]} alone need {nbytes} bytes, more than budget={budget}; "
                             f"raise the budget to at least {nbytes}")
        if cur and budget is not None and used + nbytes > budget:
            out.append(cur)
            cur, used = [], 0
        cur += names
        used += nbytes
    return out + ([cur] if cur else [])
