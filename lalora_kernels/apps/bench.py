"""``lalora bench``: what LaLoRA's curvature and penalty cost as Llama-shaped models grow.

Per size and backend: proxy-pass time relative to plain forward+backward on the same batches,
factor memory (ours vs generic K-FAC on ``lora_A``/``lora_B`` as separate Linears), penalty time
per step relative to a LoRA training step, and peak memory. Peers (curvlinops'
``KFACLinearOperator`` on the same LoRA weights and data) are measured when installed. Writes a
table, JSON and a log-log plot of cost against parameter count with fitted slopes.

Real layer shapes (``llama-3.2-1b``, ``llama-3.2-3b``, ``llama-3.1-8b``) run a slice of ``--layers``
layers with a 1024-token vocabulary: the cost per layer is what is measured.
"""
from __future__ import annotations

import json
import math
import resource
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .. import _cpp
from ..capture import estimate_curvature
from ..capture_lowrank import LowRank
from ..ops import HAS_TRITON
from ..penalty import LaLoRARegularizer
from .tiny import llama_lora, random_batches

# name: (hidden, MLP, heads, kv heads, layers)
SIZES = {
    "tiny": (64, 176, 4, 2, 2), "small": (128, 344, 4, 2, 2), "base": (256, 688, 8, 4, 2),
    "medium": (512, 1376, 8, 4, 2), "large": (1024, 2752, 16, 8, 2),
    "llama-3.2-1b": (2048, 8192, 32, 8, 16), "llama-3.2-3b": (3072, 8192, 24, 8, 28),
    "llama-3.1-8b": (4096, 14336, 32, 8, 32),
}
DEFAULT_SIZES = ("tiny", "small", "base", "medium", "large")


def _best(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def _fwd_bwd(model, batches):
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        F.cross_entropy(logits.flatten(0, 1).float(), b["labels"][:, 1:].flatten(), reduction="sum").backward()
    model.zero_grad(set_to_none=True)


def _peak_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # process high-water mark


def generic_kfac_bytes(curv) -> int:
    """fp32 bytes of generic K-FAC on lora_A and lora_B as separate Linears (no sharing, no skipping)."""
    return 4 * sum(a.in_features ** 2 + 2 * a.rank ** 2 + a.out_features ** 2 for a in curv.adapters.values())


class FlatLogits(torch.nn.Module):
    """A causal LM as curvlinops sees a classifier: ids -> next-token logits, (batch * (seq-1), V)."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, ids):
        return self.m(input_ids=ids).logits[:, :-1].flatten(0, 1)


def _peer_curvlinops(model, batches, repeats: int) -> Optional[dict]:
    """curvlinops' KFAC on the same LoRA parameters and data; None when curvlinops is absent."""
    try:
        from curvlinops import KFACLinearOperator
    except ImportError:
        return None

    params = [p for n, p in model.named_parameters() if "lora_" in n]
    data = [(b["input_ids"], b["labels"][:, 1:].flatten()) for b in batches]
    loss = torch.nn.CrossEntropyLoss(reduction="sum", ignore_index=-100)
    ops = []

    def build():
        op = KFACLinearOperator(FlatLogits(model), loss, params, data, fisher_type="empirical",
                                kfac_approx="expand", check_deterministic=False, progressbar=False)
        op.compute_kronecker_factors()
        ops[:] = [op]
    seconds = _best(build, repeats)
    op = ops[0]
    nbytes = sum(t.numel() * t.element_size() for store in (op._input_covariances, op._gradient_covariances)
                 for t in store.values())
    return {"seconds": seconds, "bytes": nbytes}


def measure(size: str, *, layers: Optional[int], variant: str, device: str, backends: Sequence[str],
            bsz: int = 4, seq: int = 128, n_batches: int = 2, repeats: int = 3, peers: bool = True,
            lowrank: Optional[int] = None) -> list[dict]:
    import os
    h, inter, heads, kv, n_layers = SIZES[size]
    n_layers = min(layers, n_layers) if layers else n_layers
    vocab = 1024
    model = llama_lora(hidden=h, inter=inter, layers=n_layers, heads=heads, kv_heads=kv, vocab=vocab, r=8,
                       nonzero_b=0.02).to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    data = [{k: v.to(device) for k, v in b.items()} for b in random_batches(n_batches, bsz, seq, vocab)]
    t_fb = _best(lambda: _fwd_bwd(model, data), repeats)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)

    def train_step():
        _fwd_bwd(model, data[:1])
        opt.step()
    t_step = _best(train_step, repeats)
    rows = []
    runs = [(b, b, None) for b in backends]
    if lowrank:                 # low-rank factors (one-pass sketch) on the default kernels
        runs.append((f"lowrank k={lowrank}", "auto", LowRank(rank=lowrank, capture="sketch")))
    for label, backend, storage in runs:
        os.environ["LALORA_BACKEND"] = backend
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est = lambda: estimate_curvature(model, data, variant=variant, progress=False, storage=storage)  # noqa: E731
            t_est = _best(est, repeats)
            curv = est()
        reg = LaLoRARegularizer(curv, lam=1.0).to(device)
        t_pen = _best(lambda: reg(model).backward(), repeats)
        model.zero_grad(set_to_none=True)
        rows.append({"size": size, "layers": n_layers, "hidden": h, "params": n_params, "backend": label,
                     "variant": variant, "tokens": n_batches * bsz * seq,
                     "fwd_bwd_s": round(t_fb, 4), "proxy_s": round(t_est, 4),
                     "proxy_vs_fwd_bwd": round(t_est / t_fb, 3),
                     "penalty_ms": round(1e3 * t_pen, 3), "step_ms": round(1e3 * t_step, 3),
                     "penalty_vs_step": round(t_pen / t_step, 4),
                     "factor_MiB": round(curv.memory_bytes() / 2**20, 3),
                     "generic_kfac_MiB": round(generic_kfac_bytes(curv) / 2**20, 3),
                     "peak_MiB": round(_peak_mib(device), 1)})
        os.environ.pop("LALORA_BACKEND", None)
    if peers:
        peer = _peer_curvlinops(model, data, repeats)
        if peer is not None:
            rows.append({**rows[0], "backend": "curvlinops", "proxy_s": round(peer["seconds"], 4),
                         "proxy_vs_fwd_bwd": round(peer["seconds"] / t_fb, 3), "penalty_ms": None,
                         "penalty_vs_step": None, "factor_MiB": round(peer["bytes"] / 2**20, 3),
                         "peak_MiB": round(_peak_mib(device), 1)})
    return rows


def slopes(rows: list[dict], key: str) -> dict[str, float]:
    """Least-squares slope of log(key) against log(params), per backend."""
    out = {}
    for backend in dict.fromkeys(r["backend"] for r in rows):
        pts = [(math.log(r["params"]), math.log(r[key])) for r in rows
               if r["backend"] == backend and r.get(key)]
        if len(pts) >= 2:
            mx = sum(x for x, _ in pts) / len(pts)
            my = sum(y for _, y in pts) / len(pts)
            sxx = sum((x - mx) ** 2 for x, _ in pts)
            out[backend] = sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else float("nan")
    return out


def plot(rows: list[dict], path: Path) -> Optional[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'lalora_kernels[plot]'): no plot written")
        return None
    metrics = [("proxy_s", "proxy pass (s)"), ("fwd_bwd_s", "plain fwd+bwd (s)"),
               ("penalty_ms", "penalty fwd+bwd (ms)"), ("factor_MiB", "factor memory (MiB)")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8))
    for ax, (key, label) in zip(axes, metrics):
        fit = slopes(rows, key)
        for backend in dict.fromkeys(r["backend"] for r in rows):
            if key == "fwd_bwd_s" and backend == "curvlinops":
                continue          # the peer row repeats the same baseline
            pts = sorted((r["params"], r[key]) for r in rows if r["backend"] == backend and r.get(key))
            if pts:
                ax.loglog(*zip(*pts), "o-", label=f"{backend} (slope {fit.get(backend, float('nan')):.2f})")
        ax.set_xlabel("parameters")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(sizes: Sequence[str] = DEFAULT_SIZES, layers: Optional[int] = None, variant: str = "kfac",
        out: str = "lalora_bench_out", repeats: int = 3, peers: bool = True, progress: bool = True,
        lowrank: Optional[int] = None) -> dict:
    from tqdm.auto import tqdm
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise ValueError(f"unknown sizes {unknown}; choose from {list(SIZES)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # torch: the reference with dense factors; cpp / triton: packed factors on the native kernels
    backends = ["torch"] + (["cpp"] if device == "cpu" and _cpp.available() else []) \
        + (["triton"] if device == "cuda" and HAS_TRITON else [])
    rows = []
    for size in tqdm(sizes, desc="lalora bench", disable=not progress):
        rows += measure(size, layers=layers, variant=variant, device=device, backends=backends,
                        repeats=repeats, peers=peers, lowrank=lowrank)
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    fits = {k: slopes(rows, k) for k in ("proxy_s", "fwd_bwd_s", "penalty_ms", "factor_MiB")}
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "variant": variant,
              "rows": rows, "loglog_slopes": fits}
    (outdir / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    cols = ["size", "layers", "params", "backend", "proxy_vs_fwd_bwd", "penalty_ms", "penalty_vs_step",
            "factor_MiB", "generic_kfac_MiB", "peak_MiB"]
    table = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n" + "\n".join(
        "| " + " | ".join("-" if r.get(c) is None else str(r[c]) for c in cols) + " |" for r in rows)
    (outdir / "bench.md").write_text(table + "\n")
    p = plot(rows, outdir / "cost_vs_params.png")
    print(table)
    print("log-log slopes vs parameters: " + json.dumps({k: {b: round(v, 2) for b, v in d.items()}
                                                           for k, d in fits.items()}))
    print(f"wrote {outdir / 'bench.json'}, {outdir / 'bench.md'}" + (f", {p}" if p else ""))
    return result
