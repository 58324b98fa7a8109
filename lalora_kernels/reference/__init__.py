"""Pure-PyTorch, float64-capable implementation of SPEC.md: the CPU backend and the test oracle."""
from .closed_form import finalize, penalty_closed_form
from .covariance import cov_update_, sqcov_update_
from .gram import class_views, grouped_gram, sym_gram

__all__ = ["cov_update_", "sqcov_update_", "sym_gram", "grouped_gram", "class_views", "finalize",
           "penalty_closed_form"]
