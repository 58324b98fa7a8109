"""The LaLoRA penalty, by job: ``arena`` (how a curvature is laid out for one grouped call),
``epilogues`` (each variant's math on the grouped products), ``module`` (``LaplacePenalty``: tensors
in), ``regularizer`` (``LaLoRARegularizer``: a peft model in; ``fused_laplace_penalty``)."""
from .module import LaplacePenalty
from .regularizer import LaLoRARegularizer, fused_laplace_penalty

__all__ = ["LaplacePenalty", "LaLoRARegularizer", "fused_laplace_penalty"]
