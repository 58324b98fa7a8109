"""``LaplacePenalty``: the grouped LaLoRA penalty over the adapters of one curvature, tensors in.

    R = sum over adapters of  lam/c * R_F(dA, dB)  +  delta/2 ||dtheta||^2      (SPEC section 4)

with ``c`` the ``mean_diag`` normalisation constant (1 when ``normalize=None``). Every read of a
big factor happens in one call over all bundles of the model (``arena``), with ``r`` rows per
adapter and side for every Kronecker variant: for kfac/tri ``lalora::grouped_gram_quad``, which
also applies the epilogue (value and the gradient of the bundle deltas); for wkfac
``lalora::grouped_gram``, whose Grams feed wkfac's epilogue (``epilogues``). tri's cross blocks and
wkfac's epilogue, O((o + i) r^2) per adapter, are small batched torch ops. The gradient never
reads a factor again.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..curvature import AdapterInfo, LoRACurvature
from ..reference.grouped_gram import class_views, compute_dtype
from . import arena, epilogues

NORMALIZE = (None, "mean_diag")


def _number(name: str, x) -> float:
    """A finite float >= 0 from a Python, numpy or 0-d tensor number, else an error naming ``name``."""
    if isinstance(x, Tensor) and x.numel() == 1 and not x.requires_grad:
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x) or x < 0:
        raise ValueError(f"{name}={x!r} must be a finite number >= 0")
    return float(x)


class LaplacePenalty(nn.Module):
    """Grouped LaLoRA penalty over the adapters of one curvature; ``forward(A, B) -> scalar``.

    A, B: lists of the current LoRA weights in ``curvature.adapters`` order, ``A[k]`` (r, i) and
    ``B[k]`` (o, r), any float dtype, on the device of this module's tensors.

    Construction copies the factors into one flat arena and re-points ``curvature``'s tensors at
    views of it, so factor memory is not doubled. The arena keeps the curvature's layout and dtype:
    with tile-packed factors every step reads about half the bytes, and bf16 factors
    (``curvature.to(dtype=torch.bfloat16)``) halve them again; products then accumulate in fp32.
    Moving this module with ``.to()`` moves its tensors only; the curvature keeps the old views.
    """

    def __init__(self, curvature: LoRACurvature, lam: float, prior_precision: float = 0.0,
                 normalize: Optional[str] = "mean_diag"):
        super().__init__()
        lam, prior_precision = _number("lam", lam), _number("prior_precision", prior_precision)
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize={normalize!r} is unknown; use 'mean_diag' or None")
        c = curvature.norm_constant if normalize == "mean_diag" else 1.0
        if not c > 0:
            raise ValueError("normalize='mean_diag' needs a curvature with a positive mean diagonal, this "
                             f"one has {c}: the proxy data gave no gradient signal; use normalize=None")
        self.variant, self.lam, self.delta, self.norm = curvature.variant, float(lam), float(prior_precision), c
        self.names = list(curvature.adapters)
        self.infos: list[AdapterInfo] = list(curvature.adapters.values())
        self._want = ([torch.Size((a.rank, a.in_features)) for a in self.infos],     # A and B shapes,
                      [torch.Size((a.out_features, a.rank)) for a in self.infos])    # checked every step
        stored = curvature.factor_dtype
        if stored not in (torch.float32, torch.float64, torch.bfloat16):
            raise ValueError(f"the curvature's factors are {stored}; the penalty takes float32, float64 or bfloat16 "
                             "factors: convert with curvature.to(dtype=torch.float32)")
        self._dtype = compute_dtype(stored)     # products and small tensors: fp32 for bf16 factors
        self._device = curvature.get("A0", self.names[0]).device
        s2 = {n: (1.0 if self.variant == "diag" else a.scaling ** 2) for n, a in curvature.adapters.items()}
        self._coef = {n: self.lam * s2[n] / c for n in self.names}
        worst = max(self._coef.values(), default=0.0)
        if not math.isfinite(worst):
            raise ValueError(f"lam={lam!r} times the scaling^2 over the curvature's normalisation {c!r} is not finite "
                             f"({worst!r}): use a smaller lam, or normalize=None")
        self.anchor_A = self._flat([curvature.get("A0", n) for n in self.names])
        self.anchor_B = self._flat([curvature.get("B0", n) for n in self.names])
        self.diag_classes: list[arena.DiagClass] = []
        self.a_classes: list[arena.SideClass] = []
        self.b_classes: list[arena.SideClass] = []
        self.pairs: list[arena.RankPairs] = []
        self.eigen: Optional[Tensor] = None
        if self.variant == "diag":
            self._build_diag(curvature)
        else:
            self._build_kron(curvature)
        weighted = ([self.quad_C] if hasattr(self, "quad_C") else []) + [c.F for c in self.diag_classes]
        if any(t.device.type != "meta" and not bool(torch.isfinite(t).all()) for t in weighted):
            raise ValueError(f"lam={lam!r} times the curvature overflows {self._dtype}: use a smaller lam, or "
                             "normalize='mean_diag'")

    # ---- construction -------------------------------------------------------------------------
    def _cast(self, t: Tensor) -> Tensor:
        return t.to(device=self._device, dtype=self._dtype)

    def _flat(self, ts: Sequence[Tensor]) -> Tensor:
        return self._cast(torch.cat([t.reshape(-1) for t in ts]))

    def _stack(self, ts: Sequence[Tensor]) -> Tensor:
        return self._cast(torch.stack([t.to(self._dtype) for t in ts]))

    def _build_diag(self, curv: LoRACurvature) -> None:
        """Classes of same-shaped FA (resp. FB), each stacked with its coefficient folded in."""
        for side in ("A", "B"):
            shapes: dict[tuple, list[int]] = {}
            for k, n in enumerate(self.names):
                F = curv.get(f"F{side}", n)
                if F is not None:
                    shapes.setdefault(tuple(F.shape), []).append(k)
            for pos in shapes.values():
                names = [self.names[k] for k in pos]
                self.diag_classes.append(arena.DiagClass(
                    side, pos, self._stack([self._coef[n] * curv.get(f"F{side}", n).to(self._dtype) for n in names]),
                    self._stack([curv.get(f"{side}0", n) for n in names])))

    def _build_kron(self, curv: LoRACurvature) -> None:
        self.a_classes, self.b_classes = arena.side_classes(curv)
        sides = self.a_classes + self.b_classes
        self.tile = curv.tile if curv.layout == "packed" else 0
        meta, self.ranks = arena.gram_meta(sides, self.tile, curv)
        self.classes = meta.classes
        keys = [k for c in sides for k in c.factor_keys]
        self.arena = arena.adopt(curv, keys)
        self.eigen = arena.adopt(curv, [curv.eigen_key(k) for k in keys]) if curv.layout == "lowrank" else None
        for c in sides:
            c.anchor = self._stack([curv.get(f"{c.side}0", n) for n in c.names])
        blocks = arena.diagonal_blocks(sides, meta)
        if self.variant == "wkfac":
            anchor_G = self._wkfac_constants()
            self.pairs = arena.rank_pairs(self.a_classes, self.b_classes, self._coef, self._dtype, blocks, anchor_G)
        else:
            self.quad_C = epilogues.quad_weights(blocks, curv, self._coef, meta.g_size, self._dtype, self._device)
            if self.variant == "tri":
                for c in sides:
                    c.K = self._stack([self._k(curv.get("Ka" if c.side == "A" else "Kb", n), c) for n in c.names])
                self.pairs = arena.rank_pairs(self.a_classes, self.b_classes, self._coef, self._dtype)
        for p in self.pairs:
            for name, t in arena.tensors_of(p):
                setattr(p, name, t.to(self._device))

    def _k(self, t: Optional[Tensor], c: arena.SideClass) -> Tensor:
        shape = (c.rank, c.dim) if c.side == "A" else (c.dim, c.rank)
        return torch.zeros(shape, dtype=self._dtype, device=self._device) if t is None else t

    @torch.no_grad()
    def _wkfac_constants(self) -> Tensor:
        """wkfac's anchor products, from one ``grouped_gram`` over the arena with the anchors as rows:
        sets ``Ka = A* Sx`` and ``Kb = Sg B*`` per class and returns that G, whose diagonal blocks are
        ``Caa = A* Sx A*^T`` and ``Cbb = B*^T Sg B*``."""
        D0 = torch.cat([c.anchor.reshape(-1) for c in self.a_classes]
                       + [c.anchor.transpose(1, 2).reshape(-1) for c in self.b_classes])
        G0, Q0 = self._gram(D0)
        views = class_views(Q0, self.classes, "D")
        for c in self.a_classes:        # (bundles, per r, i) -> (adapters, r, i)
            c.K = next(views).reshape(-1, c.rank, c.dim)
        for c in self.b_classes:        # (adapters, r, o) -> Kb (adapters, o, r)
            c.K = next(views).transpose(1, 2)
        return G0

    def _gram(self, D: Tensor) -> tuple[Tensor, Tensor]:
        """G and Q of every bundle: one grouped call over the arena (tile-packed, dense or low-rank)."""
        if self.eigen is not None:
            return torch.ops.lalora.grouped_gram_lowrank(D, self.arena, self.eigen, self.classes, self.ranks)
        return torch.ops.lalora.grouped_gram(D, self.arena, self.classes, self.tile)

    def _structs(self):
        return self.diag_classes + self.a_classes + self.b_classes + self.pairs

    def tensors(self):
        """Every tensor the penalty holds: the factor arena and the small per-class ones."""
        for name in ("anchor_A", "anchor_B", "arena", "eigen", "quad_C"):
            if isinstance(getattr(self, name, None), Tensor):
                yield getattr(self, name)
        for obj in self._structs():
            for _, t in arena.tensors_of(obj):
                yield t

    def memory_bytes(self) -> int:
        """Bytes the penalty holds (distinct storages counted once)."""
        seen = {}
        for t in self.tensors():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(seen.values())

    def _apply(self, fn, recurse=True):
        """``.to(device)``/``.cuda()`` move every tensor; a dtype change is refused (the factors keep
        the dtype they were built with, products run in fp32 or fp64 whatever the model's dtype)."""
        for t in (self.anchor_A, getattr(self, "arena", None)):
            if t is not None and fn(t[:0]).dtype != t.dtype:
                raise ValueError(
                    f"the penalty's tensors stay {t.dtype}: move it with .to(device) only. It takes LoRA "
                    "weights of any float dtype; to store the factors in another dtype, convert the "
                    "curvature before building it: curvature.to(dtype=torch.bfloat16)")
        for name in ("anchor_A", "anchor_B", "arena", "eigen", "quad_C"):
            if isinstance(getattr(self, name, None), Tensor):
                setattr(self, name, fn(getattr(self, name)))
        for obj in self._structs():
            for name, t in arena.tensors_of(obj):
                setattr(obj, name, fn(t))
        self._device = self.anchor_A.device
        return super()._apply(fn, recurse)

    def _shape_error(self, A: Sequence[Tensor], B: Sequence[Tensor]) -> None:
        for k, (a, b, info) in enumerate(zip(A, B, self.infos)):
            if a.shape != (info.rank, info.in_features) or b.shape != (info.out_features, info.rank):
                raise ValueError(
                    f"adapter {k} ({self.names[k]!r}): A[{k}] is {tuple(a.shape)} and B[{k}] is {tuple(b.shape)}, "
                    f"but the curvature was estimated for A ({info.rank}, {info.in_features}) and B "
                    f"({info.out_features}, {info.rank}); pass the weights in curvature.adapters order")

    # ---- evaluation ---------------------------------------------------------------------------
    def forward(self, A: Sequence[Tensor], B: Sequence[Tensor]) -> Tensor:
        if len(A) != len(self.names) or len(B) != len(self.names):
            raise ValueError(f"expected {len(self.names)} A and B tensors (one per adapter), got "
                             f"{len(A)} and {len(B)}")
        dev = self.anchor_A.device
        if A[0].device != dev:
            raise ValueError(f"LoRA weights are on {A[0].device} but the penalty's factors are on {dev}; "
                             f"move the regulariser with .to({str(A[0].device)!r})")
        if [a.shape for a in A] != self._want[0] or [b.shape for b in B] != self._want[1]:
            self._shape_error(A, B)
        no_autocast = (torch.autocast(device_type=dev.type, enabled=False)   # small products stay in fp32
                       if torch.amp.is_autocast_available(dev.type) else contextlib.nullcontext())
        with no_autocast:
            value = self._diag(A, B) if self.variant == "diag" else self._kron(A, B)
            if self.delta > 0:
                dA = torch.cat([a.reshape(-1) for a in A]).to(self._dtype) - self.anchor_A
                dB = torch.cat([b.reshape(-1) for b in B]).to(self._dtype) - self.anchor_B
                value = value + 0.5 * self.delta * (dA.square().sum() + dB.square().sum())
        return value

    def _diag(self, A, B) -> Tensor:
        value = self.anchor_A.new_zeros(())
        for c in self.diag_classes:
            W = A if c.side == "A" else B
            d = torch.stack([W[k] for k in c.positions]).to(self._dtype) - c.anchor
            value = value + torch.ops.lalora.diag_quad(c.F, d)[0]
        return value

    def _kron(self, A, B) -> Tensor:
        dA = [torch.stack([A[k] for k in c.positions]).to(self._dtype) - c.anchor for c in self.a_classes]
        dB = [torch.stack([B[k] for k in c.positions]).to(self._dtype) - c.anchor for c in self.b_classes]
        D = torch.cat([d.reshape(-1) for d in dA] + [d.transpose(1, 2).reshape(-1) for d in dB])
        zero = self.anchor_A.new_zeros(())
        if self.variant == "wkfac":
            G = self._gram(D)[0]
            return epilogues.wkfac(self.pairs, G, *epilogues.z_blocks(self.a_classes, self.b_classes, dA, dB), zero)
        if self.eigen is not None:          # low rank: the products, then the kfac weights on G
            value = 0.5 * torch.dot(self.quad_C, self._gram(D)[0])
        else:
            grad = torch.is_grad_enabled() and D.requires_grad
            value, _ = torch.ops.lalora.grouped_gram_quad(D, self.arena, self.classes, self.tile, self.quad_C, grad)
        if self.variant == "tri":
            value = value + epilogues.tri_cross(self.pairs, *epilogues.z_blocks(self.a_classes, self.b_classes,
                                                                               dA, dB), zero)
        return value
