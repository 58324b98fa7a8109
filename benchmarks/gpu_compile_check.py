"""On a GPU: torch.compile(fullgraph=True) of a penalty step (Inductor) keeps the lalora:: ops as
nodes of the compiled graph, calls their Triton kernels at run time, and matches eager. Prints one line per check and exits non-zero on failure. ``--smoke`` runs the same
steps on the CPU at tiny shapes (torch backend, aot_eager: checks the script, not the kernels)."""
import os
import sys

import torch
from torch._inductor.utils import run_and_get_code

sys.path.insert(0, "benchmarks")
from bench_kernels import adapter_set  # noqa: E402

from lalora_kernels import LaplacePenalty  # noqa: E402


def main():
    smoke = "--smoke" in sys.argv[1:]
    if smoke:
        os.environ["LALORA_BACKEND"] = "torch"
    curv = adapter_set("cpu", (64, 96, 32, 2), 4, 1) if smoke else adapter_set("cuda", (256, 512, 128, 2), 8, 2)
    pen = LaplacePenalty(curv, lam=1.0, normalize=None)
    A = [(curv.get("A0", n) + 0.01).requires_grad_() for n in curv.adapters]
    B = [(curv.get("B0", n) + 0.01).requires_grad_() for n in curv.adapters]

    eager = pen(A, B)
    eager.backward()
    eager = eager.detach()
    g_eager = [a.grad.clone() for a in A]
    for a in A + B:
        a.grad = None
    # the forward is compiled (Dynamo does not trace .backward()); the backward runs through the
    # compiled graph's autograd, i.e. the ops' registered backward formulas
    fn = torch.compile(lambda: pen(A, B), fullgraph=True, backend="aot_eager" if smoke else "inductor")
    compiled, codes = (fn(), []) if smoke else run_and_get_code(fn)
    compiled.backward()
    code = "\n".join(codes)
    ok_val = torch.allclose(compiled.detach(), eager, rtol=1e-4)
    ok_grad = all(torch.allclose(a.grad, g, rtol=1e-3, atol=1e-6) for a, g in zip(A, g_eager))
    traced = smoke or "lalora.grouped_gram_quad" in code       # tri: the fused penalty op
    print(f"compile: value matches eager: {ok_val}, grads match: {ok_grad}, lalora op in graph: "
          f"{'n/a (smoke)' if smoke else traced}")
    sys.exit(0 if ok_val and ok_grad and traced else 1)


if __name__ == "__main__":
    main()
