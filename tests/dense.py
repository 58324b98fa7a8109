"""Dense materialised Kronecker forms of every variant: the independent oracle (small sizes only).

theta = (vec A, vec B) row-major; nothing here shares code with lalora_kernels.
"""
import torch


def dense_kfac_blocks(variant, s, A0, B0, Sx, Sg):
    """Curvature over theta for kfac/tri: [[F_AA, F_AB], [F_AB^T, F_BB]] (without lam)."""
    r, i = A0.shape
    o = B0.shape[0]
    GA = s**2 * B0.T @ Sg @ B0
    AB = A0 @ Sx @ A0.T
    F_AA = torch.kron(GA, Sx)
    F_BB = torch.kron(s**2 * Sg, AB)
    F_AB = torch.zeros(r * i, o * r, dtype=Sx.dtype)
    if variant == "tri":
        F_AB = torch.kron(s**2 * B0.T @ Sg, Sx @ A0.T)
    return torch.cat([torch.cat([F_AA, F_AB], 1), torch.cat([F_AB.T, F_BB], 1)], 0)


def dense_value(variant, A, B, A0, B0, s, lam, delta, Sx=None, Sg=None, FA=None, FB=None):
    """lam/2 dtheta^T F dtheta + delta/2 |dtheta|^2 from materialised matrices (autograd-ready)."""
    dth = torch.cat([(A - A0).reshape(-1), (B - B0).reshape(-1)])
    prior = 0.5 * delta * dth.square().sum()
    if variant in ("kfac", "tri"):
        F = dense_kfac_blocks(variant, s, A0, B0, Sx, Sg)
        return 0.5 * lam * dth @ F @ dth + prior
    if variant == "wkfac":
        dw = (B @ A - B0 @ A0).reshape(-1)
        return 0.5 * lam * s**2 * dw @ torch.kron(Sg, Sx) @ dw + prior
    F = torch.diag(torch.cat([FA.reshape(-1), FB.reshape(-1)]))
    return 0.5 * lam * dth @ F @ dth + prior
