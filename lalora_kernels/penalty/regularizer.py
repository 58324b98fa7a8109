"""``LaLoRARegularizer`` (a peft model in: the penalty of its active LoRA adapter, with the binding to
the model's live weights and the DDP sharding) and ``fused_laplace_penalty`` (the drop-in functional
form for front ends that keep their own curvature)."""
from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..curvature import LoRACurvature
from ..lora_layers import UncoveredParametersWarning, find_lora_layers, uncovered_trainable
from .module import LaplacePenalty


class LaLoRARegularizer(nn.Module):
    """``reg(model) -> scalar``: the LaLoRA penalty of a peft model's active LoRA adapter.

    curvature: from ``estimate_curvature`` or ``LoRACurvature.load``, for the adapter it was
    estimated on (``curvature.adapter_name``); or a dict {adapter name: curvature} to regularise
    whichever of those adapters is active at each call (``model.set_adapter``). Any other adapter
    is refused, by name. lam: LaLoRA strength; prior_precision: delta of ``P = lam F / c + delta I``
    (alone, it is the L2-to-anchor baseline); normalize: 'mean_diag' divides F by its mean diagonal
    c so that lam means the same across models and data (SPEC section 6), None uses F as estimated.

    shard_factors: under torch.distributed with DDP-averaged gradients, each rank keeps only the
    factors of its share of the adapters (balanced by bytes) and returns ``world_size`` times its
    share of the penalty, so that DDP's gradient average yields exactly the full penalty's gradient.
    ``full_value(v)`` turns such a returned value into the whole penalty (for logging).
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
            others = uncovered_trainable(model, found)
            if others:
                warnings.warn(f"{len(others)} trainable tensors are not LoRA A/B weights, so the penalty leaves them "
                              f"free: {others[:6]}{' ...' if len(others) > 6 else ''}. Freeze them (no "
                              "modules_to_save, lora_bias=False) or regularise them yourself.",
                              UncoveredParametersWarning, stacklevel=3)
            self._warned = True
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
        if name not in self.penalties:      # a rank with no share of the adapters
            return next(model.parameters()).new_zeros((), dtype=torch.float32)
        value = self.penalties[name](A, B)
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
