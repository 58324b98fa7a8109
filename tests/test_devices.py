"""The penalty with every tensor on a device other than the CPU, simulated with the meta device (no
data, no kernel; the ops' fake implementations give the shapes): construction and the step
(forward and backward) run every torch op with its devices, so a CPU tensor mixed into GPU work
fails here as it would on a GPU, where CI cannot look."""
import pytest
import torch
from problems import LAYOUT, penalty_problem as _problem

from lalora_kernels import LaplacePenalty, LoRACurvature


def _curvature(variant, p):
    skip = [variant in ("kfac", "tri") and not b.any() for b in p["B0"]]
    return LoRACurvature.from_tensors(
        [a.float() for a in p["A0"]], [b.float() for b in p["B0"]], variant=variant, scaling=p["scaling"],
        Sx=[s.float() for s in p["Sx"]], sx_index=[None if s else j for s, (*_, j) in zip(skip, LAYOUT)],
        Sg=[s.float() for s in p["Sg"]],
        Caa=[(a @ p["Sx"][j] @ a.T).float() for a, (*_, j) in zip(p["A0"], LAYOUT)] if variant != "diag" else None,
        FA=[None if s else f.float() for s, f in zip(skip, p["FA"])] if variant == "diag" else None,
        FB=[f.float() for f in p["FB"]] if variant == "diag" else None)


@pytest.mark.parametrize("layout", ["dense", "packed"])
@pytest.mark.parametrize("variant", ["diag", "kfac", "tri", "wkfac"])
def test_penalty_on_a_cuda_device_mixes_no_cpu_tensor(variant, layout):
    p = _problem(torch.float32)
    curv = _curvature(variant, p)
    if layout == "packed" and variant != "diag":
        curv = curv.to_layout("packed")
    curv.tensors = {k: t.to("meta") for k, t in curv.tensors.items()}   # built (and checked) on the CPU
    pen = LaplacePenalty(curv, lam=1.0, prior_precision=0.1)
    assert all(t.device.type == "meta" for t in pen.tensors())
    A = [a.detach().to("meta").requires_grad_() for a in p["A"]]
    B = [b.detach().to("meta").requires_grad_() for b in p["B"]]
    value = pen(A, B)
    value.backward()
    assert value.device.type == "meta" and value.shape == ()
    assert all(t.grad is not None and t.grad.device.type == "meta" for t in A + B)
