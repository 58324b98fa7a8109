"""The LaLoRA penalty: ``LaplacePenalty`` (tensors in), ``LaLoRARegularizer`` (a peft model in) and
the functional drop-in ``fused_laplace_penalty``.

    R = sum over adapters of  lam/c * R_F(dA, dB)  +  delta/2 ||dtheta||^2      (SPEC section 4)

with ``c`` the ``mean_diag`` normalisation constant (1 when ``normalize=None``). Every read of a
big factor happens in one call over all bundles of the model (factors in one flat arena, see
``grouping``), with ``r`` rows per adapter and side for every Kronecker variant: for kfac/tri
``lalora::grouped_gram_quad``, which also applies the epilogue (value and the gradient of the bundle
deltas; C++ for packed factors on the CPU); for wkfac ``lalora::grouped_gram``, whose Grams feed
wkfac's epilogue. tri's cross blocks and wkfac's epilogue, O((o + i) r^2) per adapter, are small
batched torch ops. The gradient never reads a factor again.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import weakref
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .curvature import AdapterInfo, LoRACurvature
from .grouping import GramLayout, plan_sides, side_order
from .lora_layers import find_lora_layers
from .reference.gram import class_views
from .reference.packed import compute_dtype

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
    ``B[k]`` (o, r), any float dtype, on the device of this module's buffers.

    Construction copies the factors into one flat arena and re-points ``curvature``'s tensors at
    views of it, so factor memory is not doubled. The arena keeps the curvature's layout and dtype:
    with tile-packed factors every step reads about half the bytes, and bf16 factors
    (``curvature.to(dtype=torch.bfloat16)``) halve them again; products then accumulate in fp32.
    Moving this module with ``.to()`` moves the buffers only; the curvature keeps the old views.
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
        self._pos = {n: k for k, n in enumerate(self.names)}
        stored = curvature.factor_dtype
        if stored not in (torch.float32, torch.float64, torch.bfloat16):
            raise ValueError(f"the curvature's factors are {stored}; the penalty takes float32, float64 or bfloat16 "
                             "factors: convert with curvature.to(dtype=torch.float32)")
        self._dtype = compute_dtype(stored)     # products and small tensors: fp32 for bf16 factors
        self._device = curvature.get("A0", self.names[0]).device    # where every buffer lives
        s2 = {n: (1.0 if self.variant == "diag" else a.scaling ** 2) for n, a in curvature.adapters.items()}
        self._coef = {n: self.lam * s2[n] / c for n in self.names}
        self._build(curvature)

    # ---- construction -------------------------------------------------------------------------
    def _buf(self, name: str, t: Tensor) -> str:
        """A buffer on the curvature's device (index tables and epilogue weights are built on the
        CPU; the kernels read them on the factors' device)."""
        self.register_buffer(name, t.to(self._device).contiguous(), persistent=False)
        return name

    def _stack(self, name: str, ts: Sequence[Tensor]) -> str:
        return self._buf(name, torch.stack([t.to(self._dtype) for t in ts]))

    def _build(self, curv: LoRACurvature) -> None:
        get = curv.get
        self._buf("anchor_A", torch.cat([get("A0", n).reshape(-1).to(self._dtype) for n in self.names]))
        self._buf("anchor_B", torch.cat([get("B0", n).reshape(-1).to(self._dtype) for n in self.names]))
        if self.variant == "diag":        # classes of same-shaped FA (resp. FB), stacked
            self.diag_classes = []
            for side in ("A", "B"):
                shapes: dict[tuple, list[str]] = {}
                for n in self.names:
                    if get(f"F{side}", n) is not None:
                        shapes.setdefault(tuple(get(f"F{side}", n).shape), []).append(n)
                for j, names in enumerate(shapes.values()):
                    key = f"diag{side}{j}"
                    self._stack(f"{key}_F", [self._coef[n] * get(f"F{side}", n).to(self._dtype) for n in names])
                    self._stack(f"{key}_0", [get(f"{side}0", n) for n in names])
                    self.diag_classes.append((side, key, [self._pos[n] for n in names]))
            return
        self.a_classes, self.b_classes = plan_sides(curv)
        tri, wk = self.variant == "tri", self.variant == "wkfac"
        self.tile = curv.tile if curv.layout == "packed" else 0
        layout = GramLayout([(c.dim, c.per * c.rank, len(c.factor_keys)) for c in self.a_classes + self.b_classes],
                            tile=self.tile)
        self._adopt(curv, layout, [k for c in self.a_classes + self.b_classes for k in c.factor_keys])
        items, work, pairs, self.plan = layout.tables()
        for name, table in (("items", items), ("work", work), ("pairs", pairs)):
            self._buf(name, torch.tensor(table, dtype=torch.int64).reshape(-1, len(table[0])))
        self.classes = layout.flat_classes()
        for j, c in enumerate(self.a_classes):
            self._stack(f"a{j}_A0", [get("A0", n) for n in c.names])
            if tri:
                self._stack(f"a{j}_K", [self._k(get("Ka", n), (c.rank, c.dim)) for n in c.names])
        for j, c in enumerate(self.b_classes):
            self._stack(f"b{j}_B0", [get("B0", n) for n in c.names])
            if tri:
                self._stack(f"b{j}_K", [self._k(get("Kb", n), (c.dim, c.rank)) for n in c.names])
        blocks = self._blocks(layout)
        if wk:
            anchor_G = self._wkfac_constants()
        else:           # grouped_gram_quad's weights: coef * Cbb on A-side blocks, coef * Caa on B-side ones
            C = torch.zeros(layout.g_size, dtype=self._dtype, device=self._device)
            for (side, n), idx in blocks.items():
                C[idx] = self._coef[n] * curv.get("Cbb" if side == "A" else "Caa", n).to(self._dtype)
            self._buf("quad_C", C)
        # per rank, the pairing of each adapter's A-side and B-side r x r blocks (tri's cross term, wkfac)
        self.rank_pairs = []
        a_order, b_order = side_order(self.a_classes), side_order(self.b_classes)
        for r in sorted(set(a_order) & set(b_order)) if tri or wk else ():
            both = [n for n in a_order[r] if n in set(b_order[r])]
            if not both:
                continue
            ia = torch.tensor([a_order[r].index(n) for n in both])
            ib = torch.tensor([b_order[r].index(n) for n in both])
            coef = torch.tensor([self._coef[n] for n in both], dtype=self._dtype)
            pair = [r, self._buf(f"pair{r}_ia", ia), self._buf(f"pair{r}_ib", ib), self._buf(f"pair{r}_coef", coef)]
            if wk:      # each adapter's diagonal block of G on either side, and its anchor Grams
                ga = torch.stack([blocks["A", n] for n in both])
                gb = torch.stack([blocks["B", n] for n in both])
                pair += [self._buf(f"pair{r}_ga", ga.reshape(-1)), self._buf(f"pair{r}_gb", gb.reshape(-1)),
                         self._buf(f"pair{r}_Caa", anchor_G[ga]), self._buf(f"pair{r}_Cbb", anchor_G[gb])]
            self.rank_pairs.append(tuple(pair))

    def _blocks(self, layout: GramLayout) -> dict[tuple[str, str], Tensor]:
        """(side, adapter name) -> flat indices into G of the adapter's (r, r) diagonal block."""
        blocks = {}
        for side, cs, first in (("A", self.a_classes, 0), ("B", self.b_classes, len(self.a_classes))):
            for j, c in enumerate(cs):
                R, g_off, r = layout.classes[first + j][1], layout.g_off[first + j], c.rank
                square = torch.arange(r)[:, None] * R + torch.arange(r)
                for k, n in enumerate(c.names):
                    b, p = divmod(k, c.per)
                    blocks[side, n] = g_off + b * R * R + p * r * (R + 1) + square
        return blocks

    @torch.no_grad()
    def _wkfac_constants(self) -> Tensor:
        """wkfac's anchor products, from one ``grouped_gram`` over the arena with the anchors as rows:
        stores ``Ka = A* Sx`` and ``Kb = Sg B*`` per adapter (stacked like tri's) and returns that G,
        whose diagonal blocks are ``Caa = A* Sx A*^T`` and ``Cbb = B*^T Sg B*``."""
        D0 = torch.cat([getattr(self, f"a{j}_A0").reshape(-1) for j in range(len(self.a_classes))]
                       + [getattr(self, f"b{j}_B0").transpose(1, 2).reshape(-1) for j in range(len(self.b_classes))])
        G0, Q0 = torch.ops.lalora.grouped_gram(D0, self.arena, self.items, self.work, self.pairs, self.plan,
                                               self.classes, self.tile)
        views = class_views(Q0, self.classes, "D")
        for j, c in enumerate(self.a_classes):        # (bundles, per r, i) -> (adapters, r, i)
            self._buf(f"a{j}_K", next(views).reshape(-1, c.rank, c.dim))
        for j, c in enumerate(self.b_classes):        # (adapters, r, o) -> Kb (adapters, o, r)
            self._buf(f"b{j}_K", next(views).transpose(1, 2))
        return G0

    def _adopt(self, curv: LoRACurvature, layout: GramLayout, keys: list[str]) -> None:
        """Copy the big factors into one flat arena, in layout order, and point the curvature at
        views of it, so that the factors are not held twice (originals are freed one by one)."""
        first = curv.tensors[keys[0]]
        arena = torch.empty(layout.s_size, dtype=first.dtype, device=first.device)
        off = 0
        for k in keys:
            t = curv.tensors[k]
            view = arena[off:off + t.numel()].view(t.shape)
            view.copy_(t)
            curv.tensors[k] = view
            off += t.numel()
        self._buf("arena", arena)

    def _apply(self, fn, recurse=True):
        """``.to(device)``/``.cuda()`` move the buffers; a dtype change is refused (the factors keep
        the dtype they were built with, products run in fp32 or fp64 whatever the model's dtype)."""
        for t in (self.anchor_A, getattr(self, "arena", None)):
            if t is not None and fn(t[:0]).dtype != t.dtype:
                raise ValueError(
                    f"the penalty's tensors stay {t.dtype}: move it with .to(device) only. It takes LoRA "
                    "weights of any float dtype; to store the factors in another dtype, convert the "
                    "curvature before building it: curvature.to(dtype=torch.bfloat16)")
        return super()._apply(fn, recurse)

    def _k(self, t: Optional[Tensor], shape) -> Tensor:
        return torch.zeros(shape, dtype=self._dtype, device=self._device) if t is None else t

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
        for side, key, pos in self.diag_classes:
            W = A if side == "A" else B
            d = torch.stack([W[k] for k in pos]).to(self._dtype) - getattr(self, f"{key}_0")
            value = value + torch.ops.lalora.diag_quad(getattr(self, f"{key}_F"), d)[0]
        return value

    def _kron(self, A, B) -> Tensor:
        Ds, dA, dB = [], [], []
        for j, c in enumerate(self.a_classes):
            d = torch.stack([A[self._pos[n]] for n in c.names]).to(self._dtype) - getattr(self, f"a{j}_A0")
            dA.append(d)                                                                    # (m, r, i)
            Ds.append(d)
        for j, c in enumerate(self.b_classes):
            d = torch.stack([B[self._pos[n]] for n in c.names]).to(self._dtype) - getattr(self, f"b{j}_B0")
            dB.append(d)                                                                    # (m, o, r)
            Ds.append(d.transpose(1, 2))
        D = torch.cat([D.reshape(-1) for D in Ds])
        args = (D, self.arena, self.items, self.work, self.pairs, self.plan, self.classes, self.tile)
        if self.variant == "wkfac":
            return self._wkfac(torch.ops.lalora.grouped_gram(*args)[0], dA, dB)
        value, _ = torch.ops.lalora.grouped_gram_quad(*args, self.quad_C, torch.is_grad_enabled() and D.requires_grad)
        return value + self._cross(dA, dB) if self.variant == "tri" else value

    def _zs(self, dA: list[Tensor], dB: list[Tensor]) -> tuple[dict, dict]:
        """Per rank, ``Z_a = dA Ka^T`` and ``Z_b = dB^T Kb`` (r x r per adapter) in side order."""
        za: dict[int, list[Tensor]] = {}
        zb: dict[int, list[Tensor]] = {}
        for j, c in enumerate(self.a_classes):
            za.setdefault(c.rank, []).append(dA[j] @ getattr(self, f"a{j}_K").transpose(1, 2))
        for j, c in enumerate(self.b_classes):
            zb.setdefault(c.rank, []).append(dB[j].transpose(1, 2) @ getattr(self, f"b{j}_K"))
        return za, zb

    def _cross(self, dA: list[Tensor], dB: list[Tensor]) -> Tensor:
        """tri's cross blocks: s^2 tr(Z_a Z_b) per adapter."""
        za, zb = self._zs(dA, dB)
        value = self.anchor_A.new_zeros(())
        for r, ia, ib, coef in self.rank_pairs:
            Xa = torch.cat(za[r]).index_select(0, getattr(self, ia))
            Xb = torch.cat(zb[r]).index_select(0, getattr(self, ib))
            value = value + (getattr(self, coef) * (Xa * Xb.transpose(1, 2)).sum((1, 2))).sum()
        return value

    def _wkfac(self, G: Tensor, dA: list[Tensor], dB: list[Tensor]) -> Tensor:
        """wkfac from the kfac products alone (SPEC section 4, project note): per adapter, with
        ``Gda = dA Sx dA^T``, ``Gdb = dB^T Sg dB`` (diagonal blocks of G), ``X = Z_a^T``, ``Y = Z_b``,

            R / coef = 1/2 <A Sx A^T, Gdb> + <A Sx dA^T, Y> + 1/2 <Gda, Cbb>,
            A Sx dA^T = X + Gda,   A Sx A^T = Caa + X + X^T + Gda,

        i.e. ``1/2 <V Sx V^T, U^T Sg U>`` with ``U = [dB, B*]``, ``V = [A; dA]``, where the blocks
        that involve only anchors are the constants ``Caa``, ``Cbb``, ``Ka``, ``Kb``."""
        za, zb = self._zs(dA, dB)
        value = self.anchor_A.new_zeros(())
        for r, ia, ib, coef, ga, gb, caa, cbb in self.rank_pairs:
            X = torch.cat(za[r]).index_select(0, getattr(self, ia)).transpose(1, 2)
            Y = torch.cat(zb[r]).index_select(0, getattr(self, ib))
            Gda, Gdb = G[getattr(self, ga)].view(-1, r, r), G[getattr(self, gb)].view(-1, r, r)
            AdA = X + Gda
            AA = getattr(self, caa) + AdA + X.transpose(1, 2)
            per = 0.5 * (AA * Gdb).sum((1, 2)) + (AdA * Y).sum((1, 2)) + 0.5 * (Gda * getattr(self, cbb)).sum((1, 2))
            value = value + (getattr(self, coef) * per).sum()
        return value


class LaLoRARegularizer(nn.Module):
    """``reg(model) -> scalar``: the LaLoRA penalty of a peft model's active LoRA adapter.

    curvature: from ``estimate_curvature`` or ``LoRACurvature.load``; lam: LaLoRA strength;
    prior_precision: delta of ``P = lam F / c + delta I`` (alone, it is the L2-to-anchor baseline);
    normalize: 'mean_diag' divides F by its mean diagonal c so that lam means the same across models
    and data (SPEC section 6), None uses F as estimated.

    shard_factors: under torch.distributed with DDP-averaged gradients, each rank keeps only the
    factors of its share of the adapters (balanced by bytes) and returns ``world_size`` times its
    share of the penalty, so that DDP's gradient average yields exactly the full penalty's gradient.
    ``full_value(v)`` turns such a returned value into the whole penalty (for logging).
    """

    def __init__(self, curvature: LoRACurvature, lam: float, prior_precision: float = 0.0,
                 normalize: Optional[str] = "mean_diag", shard_factors: bool = False):
        super().__init__()
        from .distributed import shard_adapters, world
        rank, size = world()
        self.scale, self.sharded = 1, bool(shard_factors) and size > 1
        if self.sharded:
            share = shard_adapters(curvature.adapters, curvature.variant, size)[rank]
            curvature = curvature.subset(share) if share else None
            self.scale = size
        self.curvature = curvature
        self.penalty = None if curvature is None else LaplacePenalty(curvature, lam, prior_precision, normalize)
        self._bound: Optional[tuple] = None     # (weakref to the model, refs, A, B) as last checked

    def _weights(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        """The model's live LoRA weights in curvature order. The model is walked and checked against
        the curvature once; later calls re-check only that each layer still has the same active,
        unmerged adapter and weight tensors (else walk and check again)."""
        bound = self._bound
        if bound is None or bound[0]() is not model or not all(
                r.is_live(a, b) for r, a, b in zip(bound[1], bound[2], bound[3])):
            refs = {r.name: r for r in find_lora_layers(model)}
            layers = {n: r.shape for n, r in refs.items()}
            if self.sharded:    # a rank's share: its adapters must exist in the model, as estimated
                layers = {n: layers[n] for n in self.penalty.names if n in layers}
            self.curvature.check_model(layers)
            mine = [refs[n] for n in self.penalty.names]
            self._bound = bound = (weakref.ref(model), mine, [r.A for r in mine], [r.B for r in mine])
        return bound[2], bound[3]

    def forward(self, model: nn.Module) -> Tensor:
        if self.penalty is None:            # a rank with no share of the adapters
            return next(model.parameters()).new_zeros((), dtype=torch.float32)
        value = self.penalty(*self._weights(model))
        return value * self.scale if self.sharded else value

    reg = forward

    def full_value(self, value: Tensor) -> float:
        """The whole penalty from what ``forward`` returned on this rank (all-reduced if sharded)."""
        if not self.sharded:
            return float(value.detach())
        import torch.distributed as dist
        v = (value.detach() / self.scale).reshape(1).to(torch.float64)
        if dist.get_backend() == "nccl":
            v = v.cuda()
        dist.all_reduce(v)
        return float(v)


def fused_laplace_penalty(A: Sequence[Tensor], B: Sequence[Tensor], A_star: Sequence[Tensor],
                          B_star: Sequence[Tensor], *, variant: str, scaling: Sequence[float],
                          lam: float, prior_precision: float = 0.0, normalize: Optional[str] = None,
                          Sx: Sequence[Tensor] = (), sx_index: Optional[Sequence[Optional[int]]] = None,
                          Sg: Optional[Sequence[Optional[Tensor]]] = None,
                          Caa: Optional[Sequence[Optional[Tensor]]] = None,
                          Cbb: Optional[Sequence[Optional[Tensor]]] = None,
                          FA: Optional[Sequence[Optional[Tensor]]] = None,
                          FB: Optional[Sequence[Optional[Tensor]]] = None) -> Tensor:
    """The LaLoRA penalty from plain tensors, for front ends that keep their own curvature.

    Per adapter k (lists of equal length n):
      A[k] (r, i), B[k] (o, r): current LoRA weights, any float dtype, differentiable.
      A_star[k], B_star[k]: the anchors theta*.
      scaling[k]: the LoRA scale s (lora_alpha / r, or / sqrt(r) for rslora).
    Curvature, per-token means in fp32 or fp64 (SPEC sections 2-4):
      Sx: the distinct input covariances (i, i); sx_index[k] is the index of adapter k's Sx in that
        list, or None when its A block is not penalised (kfac/tri with B* = 0).
      Sg[k]: output-gradient covariance (o, o) of adapter k, or None (not penalised).
      A block whose weight is exactly zero (kfac/tri: Cbb or Caa, zero when B*, resp. A*, is;
        diag: an all-zero FA or FB) is skipped with the factor only it reads, whether given or not.
      Caa[k] = A* Sx A*^T, Cbb[k] = B*^T Sg B* (r, r): optional, derived from Sx / Sg when absent;
        give Caa when the A block is not penalised (no Sx) but the B block is.
      FA[k] (r, i), FB[k] (o, r): the ``diag`` curvature (only for variant='diag').
    variant: 'diag' | 'kfac' | 'tri' | 'wkfac'; lam, prior_precision, normalize: as in
    ``LaLoRARegularizer`` (default None here: the factors are used as given).
    Returns the scalar penalty; gradients flow to A and B.

    Each call stacks the factors; a training loop should build ``LaplacePenalty`` once
    (``LoRACurvature.from_tensors`` takes the same arguments).
    """
    curv = LoRACurvature.from_tensors(A_star, B_star, variant=variant, scaling=scaling, Sx=Sx,
                                      sx_index=sx_index, Sg=Sg, Caa=Caa, Cbb=Cbb, FA=FA, FB=FB)
    return LaplacePenalty(curv, lam, prior_precision, normalize).to(A[0].device)(A, B)
