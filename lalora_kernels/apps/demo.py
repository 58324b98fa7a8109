"""``lalora demo``: learning vs forgetting, LoRA vs L2-to-anchor vs LaLoRA, end to end.

For each LoRA init (peft's zero-B default, and a non-zero one), on the same data, seeds and steps:
plain LoRA; L2-to-anchor (prior precision only); LaLoRA with each curvature variant, over a lam
sweep (``mean_diag``-normalised, so L2's delta and LaLoRA's lam share a scale). Curvature comes
from a few proxy batches of source data. Reported: source accuracy (what was kept), target accuracy
(what was learnt), curvature time and memory; as a table, JSON and a Pareto plot.
"""
from __future__ import annotations

import copy
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..capture import DegenerateCurvatureWarning, estimate_curvature
from .demo_tasks import accuracy, lm_loss, pretrained_base, task_batches
from ..penalty import LaLoRARegularizer
from .tiny import ALL_PROJ, add_lora

VARIANTS = ("diag", "kfac", "tri", "wkfac")


@dataclass
class Setup:
    """What a comparison runs on: a base-model factory and the four data splits."""
    base: Callable[[], nn.Module]
    proxy: list[dict]          # source batches the curvature is estimated on
    train: list[dict]          # target batches, one per fine-tuning step
    eval_source: list[dict]
    eval_target: list[dict]
    device: str = "cpu"
    targets: tuple = ALL_PROJ
    name: str = "embedded"
    info: dict = field(default_factory=dict)


def embedded_setup(steps: int, progress: bool) -> Setup:
    base = pretrained_base(progress)
    return Setup(base=lambda: copy.deepcopy(base), proxy=task_batches("source", 2, seed=11),
                 train=task_batches("target", steps, seed=12), eval_source=task_batches("source", 4, seed=13),
                 eval_target=task_batches("target", 4, seed=14),
                 info={"source": "next = previous + 1 over tokens 0..31",
                       "target": "next = previous + 3 over the same tokens (marker T)"})


def _to(batches, device):
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def _finetune(model, setup: Setup, reg: Optional[LaLoRARegularizer], lr: float, seed: int) -> None:
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for b in setup.train:
        loss = lm_loss(model, b)
        if reg is not None:
            loss = loss + reg(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def run_comparison(setup: Setup, *, inits=("zero", "pissa"), variants=VARIANTS, lams=(0.3, 1.0, 3.0, 10.0),
                   r: int = 8, lr: float = 5e-3, seed: int = 0, progress: bool = True) -> list[dict]:
    setup.train, setup.proxy = _to(setup.train, setup.device), _to(setup.proxy, setup.device)
    rows = []
    for init in inits:
        torch.manual_seed(seed)
        model0 = add_lora(setup.base(), r=r, targets=setup.targets,
                          init_lora_weights=True if init == "zero" else init).to(setup.device)
        model0.eval()
        start = {"source_acc": accuracy(model0, setup.eval_source),
                 "target_acc": accuracy(model0, setup.eval_target)}
        rows.append({"init": init, "method": "before fine-tuning", "lam": 0.0, **start,
                     "curv_s": 0.0, "factor_MiB": 0.0})
        curvs, seconds = {}, {}
        for v in variants:
            t0 = time.perf_counter()
            with warnings.catch_warnings():   # B* = 0 degeneracy: the table shows its effect
                warnings.simplefilter("ignore", DegenerateCurvatureWarning)
                curvs[v] = estimate_curvature(model0, setup.proxy, variant=v, progress=False)
            seconds[v] = time.perf_counter() - t0
        runs = [("lora", None, 0.0)] + [("l2", None, d) for d in lams] + \
               [(v, curvs[v], lam) for v in variants for lam in lams]
        for method, curv, lam in tqdm(runs, desc=f"fine-tuning runs (init={init})", disable=not progress):
            model = copy.deepcopy(model0)
            reg = None
            if method == "l2":
                reg = LaLoRARegularizer(curvs[variants[0]], lam=0.0, prior_precision=lam)
            elif curv is not None:
                reg = LaLoRARegularizer(curv, lam=lam)
            _finetune(model, setup, None if reg is None else reg.to(setup.device), lr, seed)
            rows.append({"init": init, "method": method, "lam": lam,
                         "source_acc": accuracy(model, setup.eval_source),
                         "target_acc": accuracy(model, setup.eval_target),
                         "curv_s": round(seconds.get(method, 0.0), 3),
                         "factor_MiB": round(curv.memory_bytes() / 2**20, 3) if curv is not None else 0.0})
    return rows


def markdown_table(rows: list[dict]) -> str:
    head = "| init | method | lam | source acc | target acc | curvature s | factors MiB |\n" \
           "|---|---|---|---|---|---|---|"
    body = [f"| {r['init']} | {r['method']} | {r['lam']:g} | {r['source_acc']:.3f} | {r['target_acc']:.3f} | "
            f"{r['curv_s']:.2f} | {r['factor_MiB']:.2f} |" for r in rows]
    return "\n".join([head, *body])


def best_table(rows: list[dict], min_target: float = 0.99) -> str:
    """Per method and init, the best source accuracy among runs that keep target accuracy >=
    ``min_target`` (the lam of that run in brackets; '-' when no run qualifies)."""
    inits = list(dict.fromkeys(r["init"] for r in rows))
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "before fine-tuning"]
    head = f"| method | {' | '.join(inits)} |\n|---|{'---|' * len(inits)}"
    body = []
    for m in methods:
        cells = []
        for init in inits:
            ok = [r for r in rows if r["method"] == m and r["init"] == init and r["target_acc"] >= min_target]
            best = max(ok, key=lambda r: r["source_acc"], default=None)    # first of equals: lowest lam
            cells.append("-" if best is None else
                         f"{best['source_acc']:.3f}" + ("" if m == "lora" else f" ({best['lam']:g})"))
        body.append(f"| {m} | {' | '.join(cells)} |")
    return "\n".join([head, *body])


def pareto_plot(rows: list[dict], path: Path) -> Optional[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'lalora_kernels[plot]'): no plot written")
        return None
    inits = sorted({r["init"] for r in rows}, key=[r["init"] for r in rows].index)
    fig, axes = plt.subplots(1, len(inits), figsize=(5.5 * len(inits), 4.5), squeeze=False)
    for ax, init in zip(axes[0], inits):
        sub = [r for r in rows if r["init"] == init]
        for method in dict.fromkeys(r["method"] for r in sub):
            pts = sorted((r for r in sub if r["method"] == method), key=lambda r: r["lam"])
            style = "*" if len(pts) == 1 else "o-"
            ax.plot([p["target_acc"] for p in pts], [p["source_acc"] for p in pts], style, label=method,
                    markersize=10 if len(pts) == 1 else 5)
        ax.set_xlabel("target accuracy (learnt)")
        ax.set_ylabel("source accuracy (kept)")
        ax.set_title(f"LoRA init: {init}")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(out: str = "lalora_demo_out", quick: bool = False, steps: Optional[int] = None,
        lams=None, inits=("zero", "pissa"), variants=VARIANTS, seed: int = 0, progress: bool = True,
        setup: Optional[Setup] = None, lr: float = 5e-3) -> dict:
    steps = (50 if quick else 100) if steps is None else steps
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    lams = tuple(lams or ((1.0, 10.0) if quick else (0.3, 1.0, 3.0, 10.0)))
    t0 = time.perf_counter()
    setup = setup or embedded_setup(steps, progress)
    setup.train = (setup.train * (steps // max(len(setup.train), 1) + 1))[:steps]
    rows = run_comparison(setup, inits=inits, variants=variants, lams=lams, lr=lr, seed=seed,
                          progress=progress)
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    result = {"setup": setup.name, "info": setup.info, "steps": steps, "lams": list(lams), "seed": seed,
              "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    (outdir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    best = best_table(rows)
    (outdir / "results.md").write_text("Best source accuracy with target accuracy >= 0.99 (lam or delta):\n\n"
                                       f"{best}\n\nEvery run:\n\n{table}\n")
    plot = pareto_plot(rows, outdir / "pareto.png")
    print(table)
    print(f"\nbest source accuracy with target accuracy >= 0.99:\n{best}")
    print(f"\n{len(rows)} rows in {result['seconds']} s; wrote {outdir / 'results.json'}, "
          f"{outdir / 'results.md'}" + (f", {plot}" if plot else ""))
    return result
