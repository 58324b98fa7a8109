"""CPU, 2 gloo ranks under FSDP2 (fully_shard per decoder layer and on the model): per-rank factor
memory and penalty time, factors replicated vs ``shard_factors=True``.

The model has Llama-3.2-1B's widths (hidden 2048, MLP 8192, 32 heads, 8 KV heads; LoRA r = 16 on all
seven projections) and as many layers as fit this 24 GB machine with two ranks. Each rank captures
``kfac`` on its own tokens (the capture runs under FSDP too), the factors are packed and cast to bf16
(products in fp32), and each rank times the penalty's forward+backward on the sharded LoRA weights
with one thread: the gather of every LoRA weight, the penalty and its gradient, the sum of the shares'
gradients (sharded mode) and the hand-over of each shard's slice. Both modes run the same fixed
number of rounds on every rank (each round has collectives), in alternation.
Run: python benchmarks/bench_fsdp_cpu.py [--layers 8 --hidden 2048 --inter 8192]
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved_medians, on_gloo_ranks, report  # noqa: E402


def _rows(rank, world, args):
    from torch.distributed.fsdp import fully_shard

    from lalora_kernels import LaLoRARegularizer, estimate_curvature
    from lalora_kernels.apps.tiny import llama_lora, random_batches
    model = llama_lora(hidden=args.hidden, inter=args.inter, layers=args.layers, heads=args.heads,
                       kv_heads=args.kv_heads, vocab=256, r=args.r, alpha=2 * args.r, nonzero_b=0.02)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        curv = estimate_curvature(model, random_batches(1, 2, args.seq, 256, seed=rank), variant="kfac",
                                  storage="packed", progress=False)
    capture_s = time.perf_counter() - t0
    curv = curv.to(dtype=torch.bfloat16)
    regs = {mode: LaLoRARegularizer(curv, lam=1.0, shard_factors=mode == "sharded")
            for mode in ("replicated", "sharded")}
    del curv

    def step(reg):
        return lambda: reg(model).backward()
    times = interleaved_medians([step(reg) for reg in regs.values()], 0.0, min_rounds=args.rounds,
                                max_rounds=args.rounds)
    rows = []
    for (mode, reg), t in zip(regs.items(), times):
        held = reg.penalty.memory_bytes() if reg.penalty is not None else 0
        rows.append({"mode": mode, "rank": rank, "adapters": len(reg.penalty.names) if reg.penalty else 0,
                     "factor_MiB": round(held / 2**20, 1), "penalty_ms": round(1e3 * t, 1),
                     "capture_s": round(capture_s, 1),
                     "peak_rss_GiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", help="results folder (default benchmarks/results)")
    args = ap.parse_args()
    rows = on_gloo_ranks(_rows, args)
    report("cpu_fsdp.json", rows, out=args.out, config=vars(args),
           what="FSDP2, 2 gloo ranks, one thread each: per-rank penalty forward+backward (median of fixed "
                "rounds, the two modes in alternation), bf16 packed factor bytes held, capture time, peak RSS")


if __name__ == "__main__":
    main()
