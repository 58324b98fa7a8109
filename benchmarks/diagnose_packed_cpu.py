"""CPU: where the packed C++ product's time goes, at n = 2048 (why r = 64 stays under
1.5x the dense reference). Side by side in one run, for R rows of D per bundle, the same
multiply-adds (R n^2 per bundle, ``bundles`` bundles of size n) five ways:

* ``dense``: ``torch.bmm(D, S)`` on dense factors (the dense reference's product, MKL);
* ``packed``: the C++ ``grouped_gram`` kernel on packed factors streamed from memory (the real case);
* ``cached``: the same kernel on one small packed factor (n_small) that every bundle reads, so the
  factor stays in cache: what the kernel does when reading the factor costs nothing;
* ``rows_split``: the R rows of each bundle as R/16 bundles of 16 rows (working set per tile 4x
  smaller, factor read R/16 times);
* ``fma_ceiling``: sgemm of the same multiply-adds on square matrices (MKL at its best here).

Reported as GFLOP/s (2 R n^2 per bundle) and ratios to ``dense``.
Run: python benchmarks/diagnose_packed_cpu.py [--n 2048 --bundles 4 --ranks 16 64]
"""
from __future__ import annotations

import argparse

import torch

from common import interleaved_medians, report
from lalora_kernels import _cpp
from lalora_kernels.reference.packed_format import TILE, pack


def classes_for(n, R, bundles, rows, per, shared):
    """Class table: each bundle's R rows as R/rows classes of ``rows`` rows (Q and D keep the same
    layout), reading factor b (or factor 0 when ``shared``)."""
    out = []
    for b in range(bundles):
        for c in range(R // rows):
            out += [n, rows, 1, b * R * n + c * rows * n, 0 if shared else b * per, b * R * R + c * rows * rows]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--n-small", type=int, default=512)
    ap.add_argument("--bundles", type=int, default=4)
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--min-run-time", type=float, default=1.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if _cpp.load() is not None:
        raise SystemExit(f"lalora_kernels._C is not available: {_cpp.load()}")
    gram = _cpp.module().grouped_gram
    n, ns, m, T = args.n, args.n_small, args.bundles, TILE
    X = torch.randn(64, n)
    S = X.T @ X / 64 + 0.1 * torch.eye(n)
    P = pack(S, T)
    arena = P.repeat(m).contiguous()
    Sd = S.expand(m, n, n).contiguous()
    Xs = torch.randn(64, ns)
    small = pack(Xs.T @ Xs / 64, T)
    ms = m * (n // ns) ** 2                       # bundles of size n_small with the same multiply-adds
    rows = []
    for R in args.ranks:
        D = torch.randn(m * R * n)
        Dm = D.view(m, R, n)
        Ds = torch.randn(ms * R * ns)
        side = round((m * R * n * n) ** (1 / 3))    # a square sgemm of about the same multiply-adds
        a, b = torch.randn(side, side), torch.randn(side, side)
        whole = classes_for(n, R, m, R, P.numel(), False)
        split = classes_for(n, R, m, 16, P.numel(), False)
        cached = classes_for(ns, R, ms, R, small.numel(), True)
        fns = [lambda: torch.bmm(Dm, Sd), lambda: gram(D, arena, whole, T), lambda: gram(Ds, small, cached, T),
               lambda: gram(D, arena, split, T), lambda: a @ b]
        t = interleaved_medians(fns, args.min_run_time)
        flops = [2 * m * R * n * n] * 4 + [2 * side**3]
        g = [f / s / 1e9 for f, s in zip(flops, t)]
        rows.append({"n": n, "R": R, "bundles": m, "n_small": ns,
                     **{f"{k}_GFLOPs": round(v, 1) for k, v in
                        zip(("dense", "packed", "cached", "rows_split", "fma_ceiling"), g)},
                     "packed_over_dense": round(g[1] / g[0], 2), "cached_over_dense": round(g[2] / g[0], 2),
                     "rows_split_over_dense": round(g[3] / g[0], 2), "ceiling_over_dense": round(g[4] / g[0], 2)})
        print(rows[-1], flush=True)
    report("cpu_packed_diagnosis.json", rows, args.out, tile=T,
           what="GFLOP/s of the same multiply-adds: dense bmm (MKL) vs packed C++ streamed, packed "
                "C++ on a cache-resident factor, rows split in 16s, and square sgemm")


if __name__ == "__main__":
    main()
