"""CPU, 2 gloo ranks: per-rank factor memory and penalty time, replicated vs shard_factors=True.

Each rank runs the penalty's forward+backward for a 16-layer Llama-shaped model (112 adapters) with
one thread (DDP's gradient all-reduce, which both modes share, is not included).
Run: python benchmarks/bench_distributed_cpu.py [--layers 16 --hidden 256]
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved_medians, on_gloo_ranks, report  # noqa: E402


def _rows(rank, world, args):
    from lalora_kernels import LaLoRARegularizer, estimate_curvature
    from lalora_kernels.apps.tiny import llama_lora, random_batches
    model = llama_lora(hidden=args.hidden, inter=args.inter, layers=args.layers, heads=8, kv_heads=4,
                       vocab=256, r=8, nonzero_b=0.02)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        curv = estimate_curvature(model, random_batches(1, 2, 16, 256, seed=rank), variant=args.variant,
                                  progress=False)
    regs = {mode: LaLoRARegularizer(curv, lam=1.0, shard_factors=mode == "sharded")
            for mode in ("replicated", "sharded")}

    def step(reg):          # no collective inside: ranks may time different repeat counts
        return lambda: reg(model).backward()
    # the two modes in alternation, so that drift in the shared machine's speed hits both alike
    times = interleaved_medians([step(reg) for reg in regs.values()], args.min_run_time)
    model.zero_grad()
    rows = []
    for (mode, reg), t in zip(regs.items(), times):
        held = reg.penalty.memory_bytes() if reg.penalty is not None else 0
        rows.append({"mode": mode, "rank": rank, "adapters": len(reg.penalty.names),
                     "factor_MiB": round(held / 2**20, 2), "penalty_ms": round(1e3 * t, 3)})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=688)
    ap.add_argument("--variant", default="kfac")
    ap.add_argument("--min-run-time", type=float, default=1.0)
    ap.add_argument("--out", help="results folder (default benchmarks/results)")
    args = ap.parse_args()
    rows = on_gloo_ranks(_rows, args)
    report("cpu_distributed.json", rows, out=args.out, config=vars(args),
           what="per-rank penalty forward+backward (median; the two modes timed in alternation) and "
                "factor bytes held, 2 gloo ranks")


if __name__ == "__main__":
    main()
