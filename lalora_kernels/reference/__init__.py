"""Pure-PyTorch, float64-capable implementation of SPEC.md: the CPU backend and the test oracle."""
from .closed_form import finalize, penalty_closed_form
from .covariance import cov_update_, sqcov_update_
from .gram import class_views, gram_numel, gram_outputs_like, gram_quad, grouped_gram, sym_grad, sym_gram
from .packed import (TILE, mirror_diagonal_tiles_, mirror_upper, pack, packed_cov_update_, packed_numel,
                     packed_sym_gram, packed_trace, unpack)

__all__ = ["cov_update_", "sqcov_update_", "sym_gram", "grouped_gram", "gram_quad", "gram_numel",
           "gram_outputs_like", "sym_grad", "class_views", "finalize", "penalty_closed_form", "TILE",
           "pack", "unpack", "mirror_upper", "mirror_diagonal_tiles_", "packed_numel", "packed_trace", "packed_cov_update_", "packed_sym_gram"]
