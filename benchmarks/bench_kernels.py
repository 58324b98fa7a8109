"""Kernel benchmarks: accumulation and grouped penalty vs baselines and measured ceilings.

On CUDA, times are ``triton.testing.do_bench`` medians (quantiles 0.5/0.2/0.8), and every rate is
reported next to the ceiling measured in the same run: a large device-to-device copy (GB/s) and a
large bf16 ``torch.mm`` (TFLOP/s). ``--smoke`` runs tiny shapes anywhere (CPU: Triton
interpreter, wall-clock medians) to check that the script works; its numbers mean nothing.

Run: python benchmarks/bench_kernels.py [--smoke] [--models 1b,3b,8b] [--layers K] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_penalty_cpu import loop_penalty  # noqa: E402
from common import machine, table  # noqa: E402

# Llama layer shapes: hidden, MLP, GQA k/v width, layers
LLAMA = {"1b": (2048, 8192, 512, 16), "3b": (3072, 8192, 1024, 28), "8b": (4096, 14336, 1024, 32)}
SMOKE = {"smoke": (128, 192, 64, 2)}
CUDA = torch.cuda.is_available()


def bench(fn) -> float:
    """Median milliseconds."""
    if CUDA:
        import triton.testing
        return triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])[0]
    fn()
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def ceilings(dev, smoke) -> dict:
    n = 1 << (20 if smoke else 28)
    x = torch.empty(n, dtype=torch.float32, device=dev).normal_()
    y = torch.empty_like(x)
    copy_ms = bench(lambda: y.copy_(x))
    m = 256 if smoke else 8192
    a = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    mm_ms = bench(lambda: a @ a)
    return {"copy_GBps": 2 * n * 4 / copy_ms / 1e6, "bf16_mm_TFLOPs": 2 * m**3 / mm_ms / 1e9}


def accumulation(dev, shapes, ranks, tokens, ceil) -> list[dict]:
    # through the op (as the package calls it): its Triton path launches the kernel directly, while
    # a bare call of the wrapped kernel in eager mode pays wrap_triton's host overhead
    cov_update_ = torch.ops.lalora.cov_update_
    os.environ["LALORA_BACKEND"] = "triton"
    rows = []
    dims = sorted({d for h, i, kv, _ in shapes.values() for d in (h, i, kv)} | set(ranks))
    for n in dims:
        for N in tokens:
            X = torch.randn(N, n, device=dev, dtype=torch.bfloat16)
            S = torch.zeros(n, n, device=dev)
            Sb = torch.zeros(n, n, device=dev, dtype=torch.bfloat16)
            ours = bench(lambda: cov_update_(S, X, None, 1.0))
            addmm = bench(lambda: Sb.addmm_(X.T, X))
            tflops = 2 * N * n * n / ours / 1e9   # dense-equivalent: N n^2 multiply-adds (SPEC section 7)
            rows.append({"n": n, "N": N, "ours_ms": round(ours, 4), "addmm_bf16_ms": round(addmm, 4),
                         "speedup": round(addmm / ours, 2), "dense_equiv_TFLOPs": round(tflops, 1),
                         "of_mm_ceiling": round(tflops / ceil["bf16_mm_TFLOPs"], 3)})
            print(rows[-1], flush=True)
    os.environ.pop("LALORA_BACKEND")
    return rows


def adapter_set(dev, shape, r, layers):
    """Random symmetric factors and anchors for LoRA on all seven projections of ``layers`` layers."""
    from lalora_kernels import LoRACurvature
    h, inter, kv, _ = shape
    proj = [("q", h, h, 0), ("k", h, kv, 0), ("v", h, kv, 0), ("o", h, h, 1), ("gate", h, inter, 2),
            ("up", h, inter, 2), ("down", inter, h, 3)]
    Sx, sx_index, Sg, A0, B0 = [], [], [], [], []

    def sym(n):             # symmetric, diagonally dominant, so positive definite (Gershgorin)
        S = torch.randn(n, n, device=dev) / (4 * n)
        return S + S.T + torch.eye(n, device=dev)
    for _ in range(layers):
        base = len(Sx)
        Sx += [sym(h), sym(h), sym(h), sym(inter)]
        for _, i, o, j in proj:
            sx_index.append(base + j)
            Sg.append(sym(o))
            A0.append(torch.randn(r, i, device=dev) / i**0.5)
            B0.append(torch.randn(o, r, device=dev) / r)
    return LoRACurvature.from_tensors(A0, B0, variant="tri", scaling=[2.0] * len(A0), Sx=Sx,
                                      sx_index=sx_index, Sg=Sg)


def as_lowrank(curv, k):
    """The same adapters with random low-rank factors of rank k (orthonormal U from a QR, random
    eigenvalues): the penalty's time does not depend on the values, and no n^3 eigendecomposition runs."""
    for key in [key for key in curv.tensors if key.startswith(("Sx/", "Sg/"))]:
        S = curv.tensors[key]
        n = S.shape[0]
        kk = min(k, n)
        U = torch.linalg.qr(torch.randn(n, kk, device=S.device))[0]
        curv.tensors[key] = U.contiguous()
        curv.tensors[curv.eigen_key(key)] = torch.rand(kk + 1, device=S.device)
    curv.layout = "lowrank"
    return curv


def unfused_quad(D, arena, classes, tile, C, grad):
    """The kfac/tri penalty op without the fused epilogue: the grouped_gram kernels write Q and G,
    then the epilogue runs as torch ops; for the side-by-side row."""
    from lalora_kernels.reference.grouped_gram_quad import epilogue
    from lalora_kernels.triton.grouped_gram import grouped_gram
    G, Q = grouped_gram(D, arena, classes, tile)
    return epilogue(G, Q, classes, C, grad)


def penalty(dev, shapes, ranks, layer_caps, ceil) -> list[dict]:
    from lalora_kernels import LaplacePenalty
    from lalora_kernels.triton import grouped_gram_quad as quad

    def floor_of(nbytes):           # ms to read nbytes once at the measured copy bandwidth
        return nbytes / ceil["copy_GBps"] / 1e6
    rows = []
    for name, shape in shapes.items():
        layers = min(shape[3], layer_caps.get(name, shape[3]))
        for r in ranks:
            curv = adapter_set(dev, shape, r, layers)
            nbytes = curv.memory_bytes()
            pen = LaplacePenalty(curv, lam=1.0, normalize=None)
            A = [(curv.get("A0", n) + 0.01).requires_grad_() for n in curv.adapters]
            B = [(curv.get("B0", n) + 0.01).requires_grad_() for n in curv.adapters]
            refs = [SimpleNamespace(name=n, A=a, B=b, scaling=2.0)
                    for n, a, b in zip(curv.adapters, A, B)]
            times = {}
            for backend in ("triton", "torch"):
                os.environ["LALORA_BACKEND"] = backend
                times[backend] = bench(lambda: pen(A, B).backward())
            os.environ.pop("LALORA_BACKEND")
            times["loop"] = bench(lambda: loop_penalty(curv, refs, 1.0).backward())
            # the same adapters with tile-packed factors (half the bytes stored) on Triton
            pen = None
            pen = LaplacePenalty(curv.to_layout("packed"), lam=1.0, normalize=None)
            os.environ["LALORA_BACKEND"] = "triton"
            times["packed"] = bench(lambda: pen(A, B).backward())
            with mock.patch.object(quad, "grouped_gram_quad", unfused_quad):
                times["packed_unfused"] = bench(lambda: pen(A, B).backward())
            packed_bytes = curv.memory_bytes()
            # and with bf16 factors (a quarter of the dense fp32 bytes; products in fp32)
            pen = None
            pen = LaplacePenalty(curv.to(dtype=torch.bfloat16), lam=1.0, normalize=None)
            times["packed_bf16"] = bench(lambda: pen(A, B).backward())
            bf16_bytes = curv.memory_bytes()
            os.environ.pop("LALORA_BACKEND")
            # and low rank (k = 256, bf16 U): the O(n k r) penalty, against its own bytes read once
            pen = None
            low = as_lowrank(adapter_set(dev, shape, r, layers), 256)
            pen = LaplacePenalty(low.to(dtype=torch.bfloat16), lam=1.0, normalize=None)
            times["lowrank"] = bench(lambda: pen(A, B).backward())
            low_bytes = low.memory_bytes()
            rows.append({"model": name, "layers": layers, "r": r, "adapters": len(A),
                         "factor_GB": round(nbytes / 1e9, 2), "ours_ms": round(times["triton"], 3),
                         "torch_ref_ms": round(times["torch"], 3), "loop_ms": round(times["loop"], 3),
                         "floor_ms": round(floor_of(nbytes), 3),
                         "x_floor": round(times["triton"] / floor_of(nbytes), 2),
                         "vs_loop": round(times["loop"] / times["triton"], 2),
                         "packed_ms": round(times["packed"], 3),
                         "packed_GB": round(packed_bytes / 1e9, 2),
                         "packed_bytes_ratio": round(packed_bytes / nbytes, 3),
                         # against the packed floor (packed bytes read once): 2x if every tile came
                         # from memory twice, toward 1x as the second loads hit L2
                         "packed_x_floor": round(times["packed"] / floor_of(packed_bytes), 2),
                         "packed_vs_dense": round(times["triton"] / times["packed"], 2),
                         # the same step with the epilogue as torch ops after the products (Q written)
                         "unfused_over_fused": round(times["packed_unfused"] / times["packed"], 2),
                         "packed_bf16_ms": round(times["packed_bf16"], 3),
                         "packed_bf16_x_floor": round(times["packed_bf16"] / floor_of(bf16_bytes), 2),
                         "lowrank_ms": round(times["lowrank"], 3), "lowrank_GB": round(low_bytes / 1e9, 3),
                         "lowrank_vs_packed_bf16": round(times["packed_bf16"] / times["lowrank"], 2)})
            print(rows[-1], flush=True)
            curv = pen = A = B = refs = None   # free this set before building the next
            if CUDA:
                torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, any device: checks the script")
    ap.add_argument("--models", default="1b,3b,8b")
    ap.add_argument("--layers", default="", help="layers per model, e.g. 8b=8 (default: all)")
    ap.add_argument("--ranks", default="8,16,64")
    ap.add_argument("--tokens", default="4096,16384")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args()
    dev = "cuda" if CUDA else "cpu"
    if not CUDA and not args.smoke:
        sys.exit("no GPU: run with --smoke (tiny shapes through the Triton interpreter)")
    shapes = SMOKE if args.smoke else {k: LLAMA[k] for k in args.models.split(",")}
    ranks = [8] if args.smoke else [int(r) for r in args.ranks.split(",")]
    tokens = [256] if args.smoke else [int(t) for t in args.tokens.split(",")]
    ceil = ceilings(dev, args.smoke)
    print("ceilings", ceil, flush=True)
    info = machine()
    info["device"] = torch.cuda.get_device_name() if CUDA else "cpu (Triton interpreter, smoke)"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"kernels_{'smoke' if args.smoke else 'gpu'}.json"

    def save(acc, pen):             # after each part, so that a run cut short keeps what it measured
        path.write_text(json.dumps({"machine": info, "ceilings": ceil, "accumulation": acc,
                                    "penalty": pen}, indent=2) + "\n")
    acc = accumulation(dev, shapes, ranks, tokens, ceil)
    save(acc, [])
    caps = {k: int(v) for k, v in (kv.split("=") for kv in args.layers.split(",") if kv)}
    pen = penalty(dev, shapes, ranks, caps, ceil)
    save(acc, pen)
    print(f"\nceilings: copy {ceil['copy_GBps']:.0f} GB/s, bf16 mm {ceil['bf16_mm_TFLOPs']:.0f} TFLOP/s")
    print(table(acc, list(acc[0])))
    print(table(pen, list(pen[0])))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
