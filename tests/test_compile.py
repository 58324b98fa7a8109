"""A training step with the penalty under torch.compile(fullgraph=True): the lalora:: ops are one node
each (traced through their fakes), and value and gradients equal eager."""
import pytest
import torch
from problems import batches, tiny_llama

from lalora_kernels import LaLoRARegularizer, estimate_curvature


@pytest.mark.parametrize("variant", ["tri", "wkfac"])
@pytest.mark.inductor
def test_compile_fullgraph_task_loss_plus_penalty(variant):
    model = tiny_llama(torch.float32, layers=1, targets=["q_proj", "v_proj", "down_proj"])
    model.eval()
    data = batches(n=1)
    curv = estimate_curvature(model, data, variant=variant, progress=False)
    reg = LaLoRARegularizer(curv, lam=3.0, prior_precision=0.1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * torch.randn_like(p))

    def step(m, batch):
        return m(**batch).loss + reg(m)

    def grads():
        return [p.grad.clone() for n, p in model.named_parameters() if "lora_" in n]

    compiled = torch.compile(step, fullgraph=True)(model, data[0])   # first call binds the model
    compiled.backward()
    g_compiled = grads()
    model.zero_grad()
    eager = step(model, data[0])
    eager.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_compiled, grads()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
