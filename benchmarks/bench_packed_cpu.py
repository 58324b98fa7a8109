"""CPU: tile-packed factors on the C++ kernels (csrc/) vs dense factors on the torch reference.

Side by side in one run, for n in {1024, 2048, 4096} and r in {8, 16, 64}:
* penalty: ``LaplacePenalty`` value + gradients (forward + backward) over as many adapters with
  in = out = n (each reads its own Sx and Sg) as make ``--dense-mib`` of dense factors, far more than
  the last-level cache (as the factors of a whole model are), packed on C++ (fp32, and bf16 factors
  with fp32 products) vs dense on the reference;
* accumulation: ``lalora::packed_cov_update_`` (C++) vs ``torch.addmm_(S, X.T, X)`` on the dense
  factor, N tokens of fp32 rows;
* bytes: packed / dense factor storage;
* ceilings: the machine's fp32 GEMM rate and read bandwidth, measured in the same run. Every pair
  is timed in alternation, so that drift in the (shared) machine's speed hits both sides alike.
Run: python benchmarks/bench_packed_cpu.py [--sizes 1024 2048 4096 --ranks 8 16 64]
"""
from __future__ import annotations

import argparse
import os

import torch

from common import cpu_ceilings, interleaved_medians, table, write
from lalora_kernels import LaplacePenalty, LoRACurvature, backends
from lalora_kernels.reference.packed_format import TILE, packed_numel


def with_backend(name, fn):
    def run():
        old = os.environ.get("LALORA_BACKEND")
        os.environ["LALORA_BACKEND"] = name
        try:
            fn()
        finally:
            if old is None:
                del os.environ["LALORA_BACKEND"]
            else:
                os.environ["LALORA_BACKEND"] = old
    return run


def spd(n, gen):
    """A cheap SPD factor (rank-64 covariance plus a ridge); the timing does not depend on values."""
    X = torch.randn(64, n, generator=gen)
    return X.T @ X / 64 + 0.1 * torch.eye(n)


def penalty_rows(n, ranks, variants, adapters, min_time, gen):
    # one factor's values serve every adapter: the penalty's arena holds a separate copy of each
    Sx, Sg = [spd(n, gen)] * adapters, [spd(n, gen)] * adapters
    rows = []
    for r in ranks:
        A0 = [torch.randn(r, n, generator=gen) / n ** 0.5 for _ in range(adapters)]
        B0 = [torch.randn(n, r, generator=gen) / r ** 0.5 for _ in range(adapters)]
        A = [(a + 1e-2 * torch.randn_like(a)).requires_grad_() for a in A0]
        B = [(b + 1e-2 * torch.randn_like(b)).requires_grad_() for b in B0]
        for variant in variants:
            kw = dict(variant=variant, scaling=[2.0] * adapters, Sx=Sx, sx_index=list(range(adapters)), Sg=Sg)
            dense = LaplacePenalty(LoRACurvature.from_tensors(A0, B0, **kw), lam=1.0)
            packed = LaplacePenalty(LoRACurvature.from_tensors(A0, B0, **kw).to_layout("packed", TILE), lam=1.0)
            half = LaplacePenalty(LoRACurvature.from_tensors(A0, B0, **kw).to(dtype=torch.bfloat16)
                                  .to_layout("packed", TILE), lam=1.0)
            step = lambda pen: (lambda: torch.autograd.grad(pen(A, B), A + B))  # noqa: E731
            values = {}                     # the same value on both paths before timing
            with_backend("torch", lambda: values.setdefault("dense", dense(A, B).detach()))()
            with_backend("cpp", lambda: values.setdefault("packed", packed(A, B).detach()))()
            with_backend("cpp", lambda: values.setdefault("bf16", half(A, B).detach()))()
            torch.testing.assert_close(values["packed"], values["dense"], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(values["bf16"], values["dense"], rtol=1e-2, atol=1e-6)
            fns = [with_backend("torch", step(dense)), with_backend("cpp", step(packed)),
                   with_backend("cpp", step(half))]
            if r == ranks[0]:
                fns.append(with_backend("torch", step(packed)))
            t_dense, t_cpp, t_half, *t_ref = interleaved_medians(fns, min_time)
            t_ref = t_ref[0] if t_ref else None
            flops = 2 * adapters * 2 * r * n * n   # D S on every factor (r rows per adapter, wkfac too)
            rows.append({"n": n, "r": r, "variant": variant, "adapters": adapters,
                         "dense_torch_ms": round(t_dense * 1e3, 2), "packed_cpp_ms": round(t_cpp * 1e3, 2),
                         "packed_torch_ms": None if t_ref is None else round(t_ref * 1e3, 2),
                         "speedup": round(t_dense / t_cpp, 2),
                         "packed_bf16_cpp_ms": round(t_half * 1e3, 2), "speedup_bf16": round(t_dense / t_half, 2),
                         "dense_GFLOPs": round(flops / t_dense / 1e9, 1),
                         "packed_GFLOPs": round(flops / t_cpp / 1e9, 1),
                         "factor_MiB_dense": round(dense.arena.numel() * 4 / 2**20, 2),
                         "factor_MiB_packed": round(packed.arena.numel() * 4 / 2**20, 2),
                         "factor_MiB_packed_bf16": round(half.arena.numel() * 2 / 2**20, 2)})
            print(rows[-1], flush=True)
    return rows


def accumulate_row(n, tokens, min_time, gen):
    X = torch.randn(tokens, n, generator=gen)
    S = torch.zeros(n, n)
    P = torch.zeros(packed_numel(n, TILE))
    t_addmm, t_cpp = interleaved_medians([lambda: S.addmm_(X.T, X),
                                          lambda: torch.ops.lalora.packed_cov_update_(P, X, None, 1.0, TILE)],
                                         min_time)
    row = {"n": n, "tokens": tokens, "addmm_dense_ms": round(t_addmm * 1e3, 2),
           "packed_cpp_ms": round(t_cpp * 1e3, 2), "speedup": round(t_addmm / t_cpp, 2),
           "bytes_packed_over_dense": round(packed_numel(n, TILE) / n ** 2, 4)}
    print(row, flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    ap.add_argument("--variants", nargs="+", default=["kfac", "wkfac"])
    ap.add_argument("--dense-mib", type=int, default=512,
                    help="dense factor bytes of all adapters together (L3 here: 36 MiB)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--min-run-time", type=float, default=1.0)
    ap.add_argument("--out", help="results folder (default benchmarks/results)")
    args = ap.parse_args()
    info = backends()
    if not info["cpp"]["available"]:
        raise SystemExit(f"the C++ kernels are not built ({info['cpp']['error']}); pip install --no-build-isolation -e .")
    gen = torch.Generator().manual_seed(0)
    pen, acc = [], []
    for n in args.sizes:
        adapters = max(1, args.dense_mib * 2**20 // (2 * n * n * 4))
        pen += penalty_rows(n, args.ranks, args.variants, adapters, args.min_run_time, gen)
        acc.append(accumulate_row(n, args.tokens, args.min_run_time, gen))
    ceilings = cpu_ceilings()
    print("ceilings:", ceilings)
    path = write("cpu_packed.json", pen, out=args.out, config=vars(args), tile=TILE, accumulate=acc,
                 ceilings=ceilings,
                 what="penalty: forward+backward median seconds, packed on C++ (fp32; bf16 factors with "
                      "fp32 products) vs dense on the torch reference, timed in alternation; GFLOPs counts "
                      "the products D S (2 R n^2 per factor), against the measured fp32 GEMM ceiling; accumulate: packed_cov_update_ "
                      "(C++) vs addmm_ on the dense factor")
    print(table(pen, list(pen[0])))
    print(table(acc, list(acc[0])))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
