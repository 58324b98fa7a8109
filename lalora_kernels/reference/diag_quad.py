"""``lalora::diag_quad``, pure PyTorch (its kernel on every device): the ``diag`` penalty of one
stack of same-shaped adapters, value and gradient in one pass (SPEC section 4):

    v = 1/2 sum F * D^2,   FD = F * D   (dv/dD = FD)
"""
from __future__ import annotations

import torch


def diag_quad(F: torch.Tensor, D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    FD = F * D.to(F.dtype)
    return 0.5 * torch.dot(FD.reshape(-1), D.to(F.dtype).reshape(-1)), FD
