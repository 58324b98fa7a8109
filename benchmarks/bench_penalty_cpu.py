"""CPU: grouped penalty (LaLoRARegularizer) vs a plain per-adapter Python loop of the same formulas.

Both compute value + gradients (forward + backward) for every adapter of a Llama-shaped model with
LoRA on all seven projections. Timed in alternation in one run (so that drift in the shared
machine's speed hits both alike); ratios are what we report.
Run: python benchmarks/bench_penalty_cpu.py [--layers 16 --hidden 256]
"""
from __future__ import annotations

import argparse
import warnings

import torch

from common import interleaved_medians, report
from lalora_kernels import LaLoRARegularizer, estimate_curvature
from lalora_kernels.lora_layers import find_lora_layers
from lalora_kernels.apps.tiny import llama_lora, random_batches


def loop_penalty(curv, refs, lam_c):
    """The per-adapter loop: SPEC section 4 formulas as plain torch ops, gradients by autograd."""
    total = 0.0
    for ref in refs:
        n, s2 = ref.name, ref.scaling ** 2
        dA, dB = ref.A - curv.get("A0", n), ref.B - curv.get("B0", n)
        v, c = curv.variant, lam_c * s2
        if v in ("kfac", "tri"):
            Sx, Sg = curv.sx(n), curv.dense(f"Sg/{n}")
            total = total + 0.5 * c * ((Sg @ dB) * (dB @ curv.get("Caa", n))).sum()
            if Sx is not None:
                total = total + 0.5 * c * ((curv.get("Cbb", n) @ dA) * (dA @ Sx)).sum()
            if v == "tri" and Sx is not None:
                Ka, Kb = curv.get("Ka", n), curv.get("Kb", n)
                total = total + c * (dA * (Kb.T @ dB @ Ka)).sum()
        elif v == "wkfac":
            dW = dB @ ref.A + curv.get("B0", n) @ dA
            Sx, Sg = curv.sx(n), curv.dense(f"Sg/{n}")
            total = total + 0.5 * c * (dW * (Sg @ dW @ Sx)).sum()
        else:
            total = total + 0.5 * lam_c * ((curv.get("FA", n) * dA.square()).sum()
                                           + (curv.get("FB", n) * dB.square()).sum())
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=688)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--min-run-time", type=float, default=1.0)
    ap.add_argument("--out", help="results folder (default benchmarks/results)")
    args = ap.parse_args()
    model = llama_lora(hidden=args.hidden, inter=args.inter, layers=args.layers, heads=8, kv_heads=4,
                       vocab=256, r=args.rank, nonzero_b=0.02)
    refs = find_lora_layers(model)
    data = random_batches(1, 2, 16, 256)
    rows = []
    for variant in ("diag", "kfac", "tri", "wkfac"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            curv = estimate_curvature(model, data, variant=variant, progress=False, storage="dense")
        reg = LaLoRARegularizer(curv, lam=1.0)
        with torch.no_grad():
            for r in refs:
                r.A.add_(1e-3 * torch.randn_like(r.A))
                r.B.add_(1e-3 * torch.randn_like(r.B))
        lam_c = 1.0 / curv.norm_constant
        torch.testing.assert_close(reg(model), loop_penalty(curv, refs, lam_c), rtol=1e-4, atol=1e-8)

        def grouped():
            reg(model).backward()

        def loop():
            loop_penalty(curv, refs, lam_c).backward()

        t_g, t_l = interleaved_medians([grouped, loop], args.min_run_time)
        model.zero_grad()
        rows.append({"variant": variant, "adapters": len(refs), "grouped_ms": round(t_g * 1e3, 3),
                     "loop_ms": round(t_l * 1e3, 3), "speedup": round(t_l / t_g, 2),
                     "factor_MiB": round(curv.memory_bytes() / 2**20, 2)})
        print(rows[-1], flush=True)
    report("cpu_penalty.json", rows, out=args.out, config=vars(args),
           what="forward+backward of the penalty over all adapters, median seconds, grouped and loop "
                "timed in alternation")


if __name__ == "__main__":
    main()
