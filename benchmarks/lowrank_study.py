"""Low-rank-plus-tail factors, measured: memory at real model sizes, fidelity on the demo model,
speed against dense and packed factors (CPU).

* memory: one real-shaped layer of Llama-3.2-1B / 3.2-3B / 3.1-8B (random init, LoRA r = 16 on all
  seven projections, 2 x 256 synthetic tokens) captured with ``LowRank(rank=k, capture="sketch")``;
  its factor bytes times the layer count, for k = 64 / 128 / 256 (U in fp32 and in bf16) and for
  ``energy=0.99`` (k per factor read off a 1024-wide sketch); the sketch capture's peak under a
  4 GiB budget, and the passes the exact capture needs under it.
* fidelity: the demo's pre-trained model with pissa-initialised LoRA (r = 8), its exact ``kfac`` and
  ``wkfac`` curvature against the low-rank one per k: relative error of the penalty's value and
  gradient on random directions and along a plain-LoRA fine-tuning trajectory; the factors'
  eigenvalue spectra (plot); and the demo's outcome (best source accuracy at target accuracy >= 0.99
  over a lam sweep) with exact and low-rank factors.
* speed: penalty forward+backward with dense (reference), packed (C++) and low-rank factors over
  as many adapters (in = out = n) as make ``--dense-mib`` of dense factors, timed in alternation;
  capture time of the demo model, dense / packed / low-rank exact / low-rank sketch.

Run: python benchmarks/lowrank_study.py [--smoke] [--out DIR]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved_medians, machine  # noqa: E402

from lalora_kernels import LaplacePenalty, LoRACurvature, estimate_curvature  # noqa: E402
from lalora_kernels.capture_lowrank import LowRank, chunks  # noqa: E402
from lalora_kernels.lora_layers import find_lora_layers  # noqa: E402

MODELS = {"Llama-3.2-1B": (2048, 8192, 32, 8, 16), "Llama-3.2-3B": (3072, 8192, 24, 8, 28),
          "Llama-3.1-8B": (4096, 14336, 32, 8, 32)}
SMOKE_MODELS = {"smoke": (64, 128, 4, 2, 3)}


def quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


# ---- memory -----------------------------------------------------------------------------------------
def gb(nbytes: float) -> float:
    """GB (1e9 bytes) to four significant digits, so that the smoke run's kilobytes do not round to 0."""
    return float(f"{nbytes / 1e9:.4g}")


def memory(models, ks, smoke) -> list[dict]:
    from lalora_kernels.apps.tiny import llama_lora, random_batches
    rows = []
    tokens = (2, 32) if smoke else (2, 256)
    for name, (h, inter, heads, kv, layers) in models.items():
        model = quiet(llama_lora, hidden=h, inter=inter, layers=1, heads=heads, kv_heads=kv, vocab=1024, r=16,
                      alpha=32, nonzero_b=0.02)
        data = random_batches(1, *tokens, 1024, pad=False)
        shapes = [r.shape for r in find_lora_layers(model)]
        kv_dim = shapes[1][1]
        # Sx: q/k/v share h, o reads h, gate/up share h, down reads inter; Sg: every projection's output
        dense = 4 * (3 * h * h + inter * inter + sum(o * o for _, o, *_ in shapes))
        row = {"model": name, "layers": layers, "dense_fp32_GB": gb(dense * layers),
               "packed_bf16_GB": gb(dense * layers / 2 / 2)}
        for k in ks:
            curv = quiet(estimate_curvature, model, data, variant="wkfac", progress=False,
                         storage=LowRank(rank=k, capture="sketch"))
            row[f"k{k}_fp32_GB"] = gb(curv.memory_bytes() * layers)
            row[f"k{k}_bf16_GB"] = gb(curv.to(dtype=torch.bfloat16).memory_bytes() * layers)
            row[f"k{k}_sketch_peak_GB"] = gb(curv.capture_stats["peak_factor_bytes"] * layers)
        wide = quiet(estimate_curvature, model, data, variant="wkfac", progress=False,
                     storage=LowRank(rank=min(1024, h), capture="sketch"))
        kept, nbytes = [], 0
        for key, U in wide.tensors.items():
            if key.startswith(("Sx/", "Sg/")):
                E = wide.tensors[LoRACurvature.eigen_key(key)]
                lam, total = E[1:].double(), wide.trace(key)
                k = int((torch.cumsum(lam, 0) < 0.99 * total).sum()) + 1
                kept.append(min(k, U.shape[1]))
                nbytes += U.shape[0] * min(k, U.shape[1]) * 4 + (k + 1) * 4
        row["energy99_fp32_GB"] = gb(nbytes * layers)
        row["energy99_k"] = f"{min(kept)}-{max(kept)} (of a {wide.tensors[next(iter(wide.tensors))].shape[1]}-wide sketch)"
        from lalora_kernels.reference.packed_format import packed_numel
        groups = [(h, [h, kv_dim, kv_dim]), (h, [h]), (h, [inter, inter]), (inter, [h])]   # (Sx, its Sgs)
        units = [(["group"], 4 * (packed_numel(i) + sum(packed_numel(o) for o in outs))) for i, outs in groups]
        row["exact_capture_passes_4GiB"] = len(chunks(units * layers, 4 << 30))
        rows.append(row)
        print(row, flush=True)
        del model
    return rows


# ---- fidelity ---------------------------------------------------------------------------------------
def penalty_and_grad(curv, A, B, lam=1.0):
    A = [a.detach().clone().requires_grad_() for a in A]
    B = [b.detach().clone().requires_grad_() for b in B]
    v = LaplacePenalty(copy.deepcopy(curv), lam=lam)(A, B)
    g = torch.autograd.grad(v, A + B)
    return float(v), torch.cat([x.reshape(-1) for x in g])


def rel(a, b):
    return float((a - b).norm() / b.norm()) if torch.is_tensor(a) else abs(a - b) / abs(b)


def fidelity(ks, smoke) -> dict:
    from lalora_kernels.apps.demo import embedded_setup
    from lalora_kernels.apps.demo_tasks import lm_loss
    from lalora_kernels.apps.tiny import add_lora
    steps = 20 if smoke else 100
    setup = embedded_setup(steps, progress=False)
    torch.manual_seed(0)
    model0 = add_lora(setup.base(), r=8, init_lora_weights="pissa").eval()
    exact = {v: quiet(estimate_curvature, model0, setup.proxy, variant=v, progress=False, storage="dense")
             for v in ("kfac", "wkfac")}
    refs = find_lora_layers(model0)
    A0, B0 = [r.A.detach().clone() for r in refs], [r.B.detach().clone() for r in refs]
    lowrank = {(v, k): copy.deepcopy(c).to_layout("lowrank", rank=k) for v, c in exact.items() for k in ks}
    lowrank.update({(v, "energy 0.99"): copy.deepcopy(c).to_layout("lowrank", energy=0.99) for v, c in exact.items()})
    # random directions, scaled like a fine-tuning step's distance from the anchor
    g = torch.Generator().manual_seed(0)
    dirs = [([a + 0.05 * torch.randn(a.shape, generator=g) * a.abs().mean() for a in A0],
             [b + 0.05 * torch.randn(b.shape, generator=g) * b.abs().mean() for b in B0]) for _ in range(5)]
    # a plain-LoRA fine-tuning trajectory (the demo's target task and optimiser), every 10 steps
    model = copy.deepcopy(model0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3, weight_decay=0.0)
    trajectory = []
    model.train()
    for t, b in enumerate(setup.train):
        lm_loss(model, b).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (t + 1) % 10 == 0:
            trajectory.append(([r.A.detach().clone() for r in find_lora_layers(model)],
                               [r.B.detach().clone() for r in find_lora_layers(model)]))
    model.eval()
    errors = []
    for (v, k), curv in lowrank.items():
        for where, points in (("random", dirs), ("trajectory", trajectory)):
            ev, eg = [], []
            for A, B in points:
                (vx, gx), (vl, gl) = penalty_and_grad(exact[v], A, B), penalty_and_grad(curv, A, B)
                ev.append(rel(vl, vx))
                eg.append(rel(gl, gx))
            errors.append({"variant": v, "k": k, "where": where, "value_rel_err": round(max(ev), 4),
                           "grad_rel_err": round(max(eg), 4), "factor_KiB": round(curv.memory_bytes() / 1024, 1),
                           "exact_KiB": round(exact[v].memory_bytes() / 1024, 1)})
            print(errors[-1], flush=True)
    spectra = {k: (torch.linalg.eigvalsh(exact["wkfac"].dense(k)).flip(0).clamp_min(0)
                   / exact["wkfac"].trace(k)).tolist()
               for k in exact["wkfac"].tensors if k.startswith(("Sx/", "Sg/"))}
    outcome = demo_outcome(setup, model0, exact, ks[-1:] if smoke else ks[-1:] + [64, "energy 0.99"], smoke)
    return {"errors": errors, "spectra": spectra, "outcome": outcome,
            "model": "the demo's pre-trained Llama (hidden 128, MLP 256, 2 layers), pissa LoRA r = 8"}


def demo_outcome(setup, model0, exact, ks, smoke) -> list[dict]:
    """Best source accuracy at target accuracy >= 0.99 over the demo's lam sweep, exact vs low rank."""
    from lalora_kernels import LaLoRARegularizer
    from lalora_kernels.apps.demo import _finetune
    from lalora_kernels.apps.demo_tasks import accuracy
    lams = (1.0, 10.0) if smoke else (1.0, 2.0, 3.0, 5.0, 10.0, 20.0)
    rows = []
    for v, curv in exact.items():
        for k in [None] + list(ks):
            if k is None:
                c = curv
            elif k == "energy 0.99":
                c = copy.deepcopy(curv).to_layout("lowrank", energy=0.99)
            else:
                c = copy.deepcopy(curv).to_layout("lowrank", rank=k)
            best = None
            for lam in lams:
                model = copy.deepcopy(model0)
                _finetune(model, setup, LaLoRARegularizer(copy.deepcopy(c), lam=lam), 5e-3, 0)
                src, tgt = accuracy(model, setup.eval_source), accuracy(model, setup.eval_target)
                if tgt >= 0.99 and (best is None or src > best[0]):
                    best = (src, lam)
            rows.append({"variant": v, "k": "exact" if k is None else k,
                         "best_source_acc": None if best is None else round(best[0], 3),
                         "lam": None if best is None else best[1]})
            print(rows[-1], flush=True)
    return rows


def spectra_plot(spectra, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind in zip(axes, ("Sx", "Sg")):
        for key, lam in spectra.items():
            if key.startswith(kind + "/"):
                short = key.split(".layers.")[-1]
                ax.semilogy(range(1, len(lam) + 1), [max(x, 1e-12) for x in lam], label=short, lw=1)
        ax.set_title(f"{kind}: eigenvalues / trace (demo model)")
        ax.set_xlabel("index")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- speed ------------------------------------------------------------------------------------------
def speed(ns, ks, dense_mib, min_time, smoke) -> list[dict]:
    import os
    rows = []
    for n in ns:
        m = max(1, dense_mib * 2**20 // (2 * n * n * 4))
        g = torch.Generator().manual_seed(0)

        def sym():
            X = torch.randn(n + 8, n, generator=g) / (n + 8) ** 0.5
            S = X.T @ X + 0.01 * torch.eye(n)
            return 0.5 * (S + S.T)
        A0 = [torch.randn(16, n, generator=g) / n ** 0.5 for _ in range(m)]
        B0 = [torch.randn(n, 16, generator=g) / 4 for _ in range(m)]
        base = LoRACurvature.from_tensors(A0, B0, variant="kfac", scaling=[2.0] * m, Sx=[sym() for _ in range(m)],
                                          sx_index=list(range(m)), Sg=[sym() for _ in range(m)])
        A = [(a + 0.01).requires_grad_() for a in A0]
        B = [(b + 0.01).requires_grad_() for b in B0]
        pens = {"dense (reference)": ("torch", LaplacePenalty(copy.deepcopy(base), lam=1.0)),
                "packed (C++)": ("auto", LaplacePenalty(copy.deepcopy(base).to_layout("packed"), lam=1.0))}
        for k in ks:
            pens[f"low rank k={k}"] = ("auto", LaplacePenalty(copy.deepcopy(base).to_layout("lowrank", rank=k), lam=1.0))

        def step(backend, pen):
            def run():
                os.environ["LALORA_BACKEND"] = backend
                pen(A, B).backward()
            return run
        times = interleaved_medians([step(*bp) for bp in pens.values()], min_time)
        os.environ.pop("LALORA_BACKEND", None)
        for (name, (_, pen)), t in zip(pens.items(), times):
            rows.append({"n": n, "adapters": m, "storage": name, "penalty_ms": round(1e3 * t, 2),
                         "vs_dense": round(times[0] / t, 2), "factor_MiB": round(pen.memory_bytes() / 2**20, 1)})
            print(rows[-1], flush=True)
    return rows


def capture_speed(smoke, min_time) -> list[dict]:
    from lalora_kernels.apps.demo_tasks import task_batches
    from lalora_kernels.apps.tiny import llama_lora
    model = quiet(llama_lora, hidden=64 if smoke else 512, inter=128 if smoke else 1376, layers=2, heads=8,
                  kv_heads=4, vocab=34, r=8, nonzero_b=0.02)
    data = task_batches("source", 2, seed=11)
    storages = {"dense": "dense", "packed": "packed", "low rank exact k=64": LowRank(rank=64),
                "low rank sketch k=64": LowRank(rank=64, capture="sketch")}
    fns = [lambda s=s: quiet(estimate_curvature, model, data, variant="wkfac", progress=False, storage=s)
           for s in storages.values()]
    times = interleaved_medians(fns, min_time, min_rounds=3)
    return [{"storage": k, "capture_s": round(t, 3), "vs_dense": round(times[0] / t, 2)}
            for k, t in zip(storages, times)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/lowrank")
    ap.add_argument("--min-run-time", type=float, default=2.0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ks = [8, 16] if args.smoke else [64, 128, 256]
    result = {"machine": machine()}
    result["memory"] = memory(SMOKE_MODELS if args.smoke else MODELS, ks, args.smoke)
    fid = fidelity([4, 8] if args.smoke else [4, 8, 16, 32], args.smoke)
    spectra_plot(fid.pop("spectra"), out / "spectra.png")
    result["fidelity"] = fid
    result["speed"] = speed([256] if args.smoke else [2048, 4096], [16] if args.smoke else [64, 128, 256],
                            4 if args.smoke else 256, 0.01 if args.smoke else args.min_run_time, args.smoke)
    result["capture"] = capture_speed(args.smoke, 0.01 if args.smoke else args.min_run_time)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "lowrank.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'lowrank.json'} and {out / 'spectra.png'} in {result['seconds']} s")


if __name__ == "__main__":
    main()
