"""CPU: cost of estimate_curvature relative to plain forward+backward over the same batches.

The baseline is what a training step's model work costs: forward, summed cross-entropy, backward
with the LoRA weights requiring grad. Measured side by side in one run.
Run: python benchmarks/bench_capture_cpu.py [--hidden 256 --layers 4]
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch.nn.functional as F

from common import report
from lalora_kernels import estimate_curvature
from lalora_kernels.apps.tiny import llama_lora, random_batches


def fwd_bwd(model, batches):
    model.eval()
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        F.cross_entropy(logits.flatten(0, 1).float(), b["labels"][:, 1:].flatten(), reduction="sum").backward()
    model.zero_grad(set_to_none=True)


def interleaved_best(fns, repeats):
    """Best-of-repeats wall time of each fn, run alternately so that machine noise hits all alike."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=688)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--bsz", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", help="results folder (default benchmarks/results)")
    args = ap.parse_args()
    data = random_batches(args.batches, args.bsz, args.seq, 512)
    rows = []
    for init, nonzero_b in (("zero", 0.0), ("nonzero", 0.02)):
        model = llama_lora(hidden=args.hidden, inter=args.inter, layers=args.layers, heads=8, kv_heads=4,
                           vocab=512, r=8, nonzero_b=nonzero_b)
        fwd_bwd(model, data[:1])
        for variant in ("diag", "kfac", "tri", "wkfac"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                est = lambda: estimate_curvature(model, data, variant=variant, progress=False)  # noqa
                t_base, t_est = interleaved_best([lambda: fwd_bwd(model, data), est], args.repeats)
                curv = est()
            rows.append({"B_init": init, "variant": variant, "fwd_bwd_s": round(t_base, 3),
                         "estimate_s": round(t_est, 3), "ratio": round(t_est / t_base, 2),
                         "factors": sum(v for k, v in curv.num_factors().items() if k in ("Sx", "Sg")),
                         "factor_MiB": round(curv.memory_bytes() / 2**20, 2)})
            print(rows[-1], flush=True)
    report("cpu_capture.json", rows, out=args.out, config=vars(args),
           what="estimate_curvature vs plain forward+backward over the same batches (best of interleaved repeats)")


if __name__ == "__main__":
    main()
