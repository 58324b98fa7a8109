"""``LaLoRARegularizer`` (a peft model in: the penalty of its active LoRA adapter, with the binding to
the model's live weights and the DDP sharding) and ``fused_laplace_penalty`` (the drop-in functional
form for front ends that keep their own curvature)."""
from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..curvature import LoRACurvature
from ..lora_layers import find_lora_layers, gathered_zero3, is_sharded, is_zero3_partitioned, warn_uncovered
from .module import LaplacePenalty


ZERO3_ORDER = (
    "under DeepSpeed ZeRO-3 the penalty's gradient can only reach the partitioned LoRA weights inside the backward "
    "of a forward that used them, and no such forward is pending: evaluate the penalty after the model's forward "
    "of the step (loss = engine(**batch).loss + reg(engine)), with gradients enabled in that forward (gradient "
    "checkpointing with use_reentrant=False, not True)")


class _Attach(torch.autograd.Function):
    """``value`` whose gradient in each of ``params`` is the given (sharded) tensor times the
    incoming gradient: how a penalty evaluated on gathered copies hands its gradient to the shards."""

    @staticmethod
    def forward(ctx, value, grads, *params):
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, dv):
        scale = float(dv)
        return (None, None, *[g * scale for g in ctx.grads])


class LaLoRARegularizer(nn.Module):
    """``reg(model) -> scalar``: the LaLoRA penalty of a peft model's active LoRA adapter.

    curvature: from ``estimate_curvature`` or ``LoRACurvature.load``, for the adapter it was
    estimated on (``curvature.adapter_name``); or a dict {adapter name: curvature} to regularise
    whichever of those adapters is active at each call (``model.set_adapter``). Any other adapter
    is refused, by name. lam: LaLoRA strength; prior_precision: delta of ``P = lam F / c + delta I``
    (alone, it is the L2-to-anchor baseline); normalize: 'mean_diag' divides F by its mean diagonal
    c so that lam means the same across models and data (SPEC section 6), None uses F as estimated.

    shard_factors: under torch.distributed, each rank keeps only the factors of its share of the
    adapters (balanced by bytes). Under DDP and DeepSpeed ZeRO it returns ``world_size`` times its
    share of the penalty, so that the engine's gradient average yields exactly the full penalty's
    gradient; under FSDP2 (LoRA weights sharded as DTensors) it returns its share and the gradient is
    summed over ranks. ``full_value(v)`` turns such a returned value into the whole penalty (for
    logging). LoRA weights split across ranks (FSDP2, ZeRO-3) are gathered for the penalty: without
    sharded factors every rank computes the whole penalty on the gathered weights.
    """

    def __init__(self, curvature: Union[LoRACurvature, Mapping[str, LoRACurvature]], lam: float,
                 prior_precision: float = 0.0, normalize: Optional[str] = "mean_diag", shard_factors: bool = False):
        super().__init__()
        from ..distributed import shard_adapters, world
        curvatures = dict(curvature) if isinstance(curvature, Mapping) else {curvature.adapter_name: curvature}
        wrong = {k: c.adapter_name for k, c in curvatures.items() if c.adapter_name != k}
        if wrong:
            raise ValueError(f"curvatures keyed by the wrong adapter {wrong} (key: the curvature's adapter_name); key "
                             "each curvature by the adapter it was estimated on")
        rank, size = world()
        self.scale, self.sharded = 1, bool(shard_factors) and size > 1
        self.curvatures: dict[str, Optional[LoRACurvature]] = {}
        self.penalties = nn.ModuleDict()
        for name, curv in curvatures.items():
            if self.sharded:
                share = shard_adapters(curv.adapters, curv.variant, size)[rank]
                curv = curv.subset(share) if share else None
            self.curvatures[name] = curv
            if curv is not None:
                self.penalties[name] = LaplacePenalty(curv, lam, prior_precision, normalize)
        if self.sharded:
            self.scale = size
        self._fsdp = False                      # set on the first call with FSDP2-sharded weights
        self._all: list = []                    # every LoRA layer of the model last bound
        self._bound: dict[str, tuple] = {}     # adapter -> (weakref to the model, refs, A, B) as last checked
        self._warned = False

    @property
    def curvature(self) -> Optional[LoRACurvature]:
        """The curvature (this rank's share under ``shard_factors``), when there is one adapter."""
        return self._only(self.curvatures)

    @property
    def penalty(self) -> Optional[LaplacePenalty]:
        """The ``LaplacePenalty`` (None on a rank without a share), when there is one adapter."""
        return self._only({n: self.penalties[n] if n in self.penalties else None for n in self.curvatures})

    @staticmethod
    def _only(d: dict):
        if len(d) != 1:
            raise AttributeError(f"this regulariser holds the adapters {sorted(d)}; pick one with "
                                 "reg.curvatures[name] / reg.penalties[name]")
        return next(iter(d.values()))

    def _adapter(self, refs) -> str:
        name = refs[0].adapter
        if name not in self.curvatures:
            known = sorted(self.curvatures)
            raise ValueError(
                f"the model's active adapter is {name!r} but this regulariser's curvature was estimated on {known}: "
                f"it would penalise {name!r} against another adapter's anchors. Estimate {name!r}'s own curvature "
                f"(model.set_adapter({name!r}); estimate_curvature(model, ...)) and pass "
                "LaLoRARegularizer({" + ", ".join(f"{k!r}: ..." for k in known + [name]) + "}, lam), or switch back "
                f"with model.set_adapter({known[0]!r})")
        return name

    def _weights(self, model: nn.Module, refs=None) -> tuple[str, list[Tensor], list[Tensor]]:
        """The active adapter and the model's live LoRA weights in curvature order. The model is walked
        and checked against that adapter's curvature once; later calls re-check only that each layer
        still runs the same adapter, unmerged, with the same weight tensors (else walk again)."""
        for name, bound in self._bound.items():
            if bound[0]() is model and all(r.is_live(a, b) for r, a, b in zip(bound[1], bound[2], bound[3])):
                return name, bound[2], bound[3]
        found = find_lora_layers(model)
        name = self._adapter(found)
        if not self._warned:
            warn_uncovered(model, found)
            self._warned = True
        self._all = found
        refs = {r.name: r for r in found}
        layers = {n: r.shape for n, r in refs.items()}
        curv, pen = self.curvatures[name], self.penalties[name] if name in self.penalties else None
        if pen is None:
            return name, [], []
        if self.sharded:    # a rank's share: its adapters must exist in the model, as estimated
            layers = {n: layers[n] for n in pen.names if n in layers}
        curv.check_model(layers)
        mine = [refs[n] for n in pen.names]
        self._bound[name] = (weakref.ref(model), mine, [r.A for r in mine], [r.B for r in mine])
        return name, self._bound[name][2], self._bound[name][3]

    def forward(self, model: nn.Module) -> Tensor:
        name, A, B = self._weights(model)
        if self._all and is_sharded(self._all[0].A):      # FSDP2: the LoRA weights are sharded DTensors
            self._fsdp = True
            return self._fsdp_forward(name)
        if self._all and is_zero3_partitioned(self._all[0].A):     # ZeRO-3: partitioned, empty outside forward
            return self._zero3_forward(name)
        if name not in self.penalties:      # a rank with no share of the adapters
            return next(model.parameters()).new_zeros((), dtype=torch.float32)
        value = self.penalties[name](A, B)
        return value * self.scale if self.sharded else value

    def _on_copies(self, name: str, whole: list[Tensor], grad: bool) -> tuple[Tensor, list]:
        """The penalty (this rank's share with ``shard_factors``) on ``whole``, gathered copies of every
        LoRA weight (A, B of ``self._all`` in turn), and its gradient in each when ``grad``."""
        copies = [w.detach().requires_grad_() for w in whole]
        by_name = {r.name: 2 * k for k, r in enumerate(self._all)}
        pen = self.penalties[name] if name in self.penalties else None
        with torch.enable_grad():
            if pen is None:
                return copies[0].new_zeros((), dtype=torch.float32), [torch.zeros_like(c) for c in copies]
            value = pen([copies[by_name[n]] for n in pen.names], [copies[by_name[n] + 1] for n in pen.names])
            grads = torch.autograd.grad(value, copies, allow_unused=True) if grad else [None] * len(copies)
        return value.detach(), [torch.zeros_like(c) if d is None else d for c, d in zip(copies, grads)]

    def _fsdp_forward(self, name: str) -> Tensor:
        """The penalty on FSDP2-sharded LoRA weights. Every rank gathers every LoRA weight (the same
        collectives in the same order on all ranks), evaluates the whole penalty (or its share, with
        ``shard_factors``) and its gradient on the gathered copies, sums the shares' gradients across
        ranks, and attaches to each local shard its slice of the whole gradient: every parameter's
        gradient counts once, whatever FSDP does with the task loss's. Returns the penalty (its
        share with ``shard_factors``: ``full_value`` sums them)."""
        import torch.distributed as dist
        from torch.distributed.tensor import distribute_tensor
        params = [t for r in self._all for t in (r.A, r.B)]
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        value, grads = self._on_copies(name, [p.full_tensor() for p in params], grad)
        if not grad:
            return value
        if self.sharded:                    # the shares' gradients, summed: one collective
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            grads = list(torch.split(flat, [g.numel() for g in grads]))
        sliced = [distribute_tensor(g.reshape(p.shape).to(p.dtype), p.device_mesh, p.placements, src_data_rank=None)
                  for g, p in zip(grads, params)]
        return _Attach.apply(value, sliced, *params)

    def _zero3_forward(self, name: str) -> Tensor:
        """The penalty on DeepSpeed ZeRO-3 partitioned LoRA weights. Every rank gathers every LoRA
        weight (DeepSpeed's collective, the same list on every rank), evaluates the penalty (its
        share with ``shard_factors``) and its gradient on copies, and hands the whole gradient to
        the gathered parameters while they are whole. Created after the step's forward, that node runs
        first in the backward and its gradient waits in each weight's accumulator for the task loss's,
        which arrives while DeepSpeed holds the weight whole again; hence ``ZERO3_ORDER``. DeepSpeed
        then reduces the sum, averaged over ranks as under DDP: every rank contributes the same
        gradient, or ``world_size`` times its share with ``shard_factors`` (and returns that much)."""
        params = [t for r in self._all for t in (r.A, r.B)]
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        if grad and not all(getattr(r.module.lora_B[r.adapter], "ds_grads_remaining", 0) > 0 for r in self._all):
            raise RuntimeError(ZERO3_ORDER)
        with gathered_zero3(params):
            value, grads = self._on_copies(name, [p.detach().clone() for p in params], grad)
            if not grad:
                return value * self.scale
            return _Attach.apply(value * self.scale, [(g * self.scale).to(p.dtype) for g, p in zip(grads, params)],
                                 *params)

    reg = forward

    def full_value(self, value: Tensor) -> float:
        """The whole penalty from what ``forward`` returned on this rank (all-reduced if sharded)."""
        if not self.sharded:
            return float(value.detach())
        import torch.distributed as dist
        v = (value.detach() / (1 if self._fsdp else self.scale)).reshape(1).to(torch.float64)
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
