"""lalora_kernels: fast, exact LaLoRA (Laplace-regularised LoRA) curvature and penalty."""
from . import ops  # noqa: F401  (registers the lalora:: operators)
from .ops import backends
from .capture import DegenerateCurvatureWarning, estimate_curvature
from .capture_lowrank import LowRank
from .curvature import AdapterInfo, LoRACurvature
from .lora_layers import UncoveredParametersWarning
from .penalty import LaLoRARegularizer, LaplacePenalty, fused_laplace_penalty
from .version import __version__

__all__ = ["backends", "estimate_curvature", "LowRank", "LoRACurvature", "AdapterInfo", "LaLoRARegularizer", "LaplacePenalty",
           "fused_laplace_penalty", "DegenerateCurvatureWarning", "UncoveredParametersWarning", "__version__"]
