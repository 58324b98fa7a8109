"""``LaLoRARegularizer`` (a peft model in: the penalty of its active LoRA adapter, with the binding to
the model's live weights and the DDP sharding) and ``fused_laplace_penalty`` (the drop-in functional
form for front ends that keep their own curvature)."""
from __future__ import annotations

import weakref
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..curvature import LoRACurvature
from ..lora_layers import find_lora_layers
from .module import LaplacePenalty


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
        from ..distributed import shard_adapters, world
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
