"""The one product of the penalty that touches a big factor (SPEC section 4), pure PyTorch.

Every variant's penalty is a small function of ``G = D S D^T`` per adapter bundle, where D stacks
the (transposed) LoRA deltas that share the symmetric factor S (``dA`` rows against ``Sx``,
``dB^T`` rows against ``Sg``). ``Q = D S`` is returned too: the gradient of any function of G is
``(dG + dG^T) Q``, so no second read of S is ever needed.
"""
from __future__ import annotations

import torch


def sym_gram(D: torch.Tensor, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """G = D S D^T and Q = D S, batched.

    D: (b, R, n) any float dtype (may be strided), S: (b, n, n) symmetric fp32/fp64.
    Returns G: (b, R, R) and Q: (b, R, n), both in S's dtype.
    """
    Q = torch.bmm(D.to(S.dtype), S)
    G = torch.bmm(Q, D.to(S.dtype).transpose(1, 2))
    return G, Q
