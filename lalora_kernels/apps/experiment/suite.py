"""``lalora experiment``: the whole suite, or its quick form, within a time budget.

Sweeps (each method gets the same strength grid, every run the same data, seed and optimiser):

* main: every method at the default setting (r = 8, 200 steps, 4 proxy batches);
* proxy: 1, 2, 4, 8, 16 proxy batches for the curvature, for LaLoRA's two recommended set-ups;
* rank: r = 4, 8, 16, 64; length: 0.5x, 1x, 2x the steps (plain LoRA, L2 and the two LaLoRA set-ups);
* seeds: each main method's pick at equal target accuracy rerun at two more seeds (other LoRA init,
  other draw of training batches), same strength;
* prediction: the curvature's forecast of forgetting against the measured one (``predict.py``).

Runs left when the budget is spent are recorded as skipped, never dropped; ``--resume`` runs only
what an earlier result in the same folder lacks (its time is added to the total).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

from . import corpus, report
from .predict import prediction_rows
from .runner import LAMS, MIGU_RATIOS, Run, Runner, Setting, load_data, main_methods, method_runs

RECOMMENDED = {"lalora-kfac (pissa)": ("pissa", None), "lalora-wkfac (zero)": ("zero", None)}


def plan(quick: bool) -> dict:
    if quick:
        return dict(setting=Setting(steps=20), lams=(1.0, 30.0), sweep_lams=(30.0,), migu=(0.3,),
                    proxy=(1, 2), ranks=(4, 8), lengths=(10, 20), pretrain_steps=100, eval_batches=2,
                    n_random=2, seeds=(1,))
    return dict(setting=Setting(), lams=LAMS, sweep_lams=(0.03, 0.1, 0.3, 1.0, 3.0), migu=MIGU_RATIOS,
                proxy=(1, 2, 4, 8, 16), ranks=(4, 8, 16, 64), lengths=(100, 200, 400), pretrain_steps=None,
                eval_batches=8, n_random=8, seeds=(1, 2))


def runs_of(p: dict) -> list:
    s = p["setting"]
    runs = method_runs("main", s, main_methods(p["lams"], p["migu"]))
    rec = {m: (init, p["sweep_lams"]) for m, (init, _) in RECOMMENDED.items()}
    for n in p["proxy"]:
        runs += method_runs("proxy", replace(s, proxy_batches=n), {"lora": ("zero", (0.0,)), **rec})
    others = {"lora": ("zero", (0.0,)), "l2": ("zero", p["sweep_lams"]), **rec}
    for r in p["ranks"]:
        runs += method_runs("rank", replace(s, r=r), others)
    for steps in p["lengths"]:
        runs += method_runs("length", replace(s, steps=steps), others)
    return runs


def seed_runs(p: dict, rows: list[dict]) -> list:
    """Each main method's pick at equal target accuracy (and plain LoRA), rerun at the other seeds."""
    s = p["setting"]
    best = report.best_at_equal_target(rows)
    methods = main_methods(p["lams"], p["migu"])
    picks = [(m, b["strength"]) for (m, key), b in best.items()
             if b is not None and key == (s.r, s.steps, s.proxy_batches, 0) and m in methods]
    return [Run("seeds", m, methods[m][0], strength, replace(s, seed=k)) for k in p["seeds"] for m, strength in picks]


def _previous(path: Path, quick: bool) -> tuple[dict, list, float]:
    """The finished runs (and prediction) of an earlier result in ``path``, to skip on ``--resume``."""
    if not path.exists():
        return {}, [], 0.0
    old = json.loads(path.read_text())
    if old["corpus"]["sha256"] != corpus.info()["sha256"] or old["quick"] != quick:
        raise ValueError(f"{path} comes from another corpus or form (quick={old['quick']}); resume into a fresh --out")
    cache = {(r["method"], r["init"], r["strength"], r["r"], r["steps"], r["proxy_batches"], r.get("seed", 0)):
             {k: v for k, v in r.items() if k != "sweep"} | {"seed": r.get("seed", 0)}
             for r in old["rows"] if "skipped" not in r}
    return cache, old.get("prediction", []), float(old["seconds"])


def run(out: str = "lalora_experiment_out", quick: bool = False, budget_minutes: float = 85.0,
        progress: bool = True, resume: bool = False) -> dict:
    try:                                             # checked before an hour of runs, not at the first CorDA run
        import attr  # noqa: F401
    except ImportError as e:
        raise ImportError("lalora experiment runs peft's CorDA, which imports attrs: "
                          "pip install 'lalora_kernels[experiment]' (or pip install attrs)") from e
    t0 = time.monotonic()
    p = plan(quick)
    data = load_data(replace(p["setting"], steps=max(p["lengths"])), eval_batches=p["eval_batches"],
                     pretrain_steps=p["pretrain_steps"], progress=progress)
    runner = Runner(data, deadline=t0 + 60 * budget_minutes)
    outdir = Path(out)
    cache, pred, before = _previous(outdir / "results.json", quick) if resume else ({}, [], 0.0)
    from tqdm.auto import tqdm

    def run_all(runs: list, desc: str) -> list[dict]:
        out = []
        for r in tqdm(runs, desc=desc, disable=not progress):
            key = (r.method, r.init, r.strength, r.setting.r, r.setting.steps, r.setting.proxy_batches, r.setting.seed)
            if key not in cache:                     # a setting shared by two sweeps runs once
                cache[key] = runner.run(r)
            out.append({**cache[key], "sweep": r.sweep})
        return out
    rows = run_all(runs_of(p), "fine-tuning runs")
    rows += run_all(seed_runs(p, rows), "the picks at other seeds")
    if not pred and time.monotonic() < runner.deadline:
        pred = prediction_rows(runner, p["setting"], n_random=p["n_random"])
    outdir.mkdir(parents=True, exist_ok=True)
    s = p["setting"]
    result = {"corpus": corpus.info(), "base": {**corpus.BASE, "pretrain": corpus.PRETRAIN,
                                                "pretrain_steps": p["pretrain_steps"] or corpus.PRETRAIN["steps"],
                                                **runner.base_metrics},
              "setting": asdict(s), "quick": quick, "tau": report.TAU, "seconds": round(before + time.monotonic() - t0, 1),
              "skipped": sum("skipped" in r for r in rows), "rows": rows,
              "prediction": pred}
    (outdir / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    write_report(result, outdir)
    return result


def write_report(result: dict, outdir: Path) -> None:
    """results.md and the plots from a result (``results.json``'s content), so that a report can be
    rebuilt without rerunning: ``write_report(json.load(open(p)), Path(p).parent)``."""
    rows, pred, s, base = result["rows"], result["prediction"], result["setting"], result["base"]
    key = (s["r"], s["steps"], s["proxy_batches"], 0)
    md = [f"# lalora experiment{' (quick)' if result['quick'] else ''}\n",
          f"Corpus: {result['corpus']['source']}, Python {result['corpus']['python']}, sha256 "
          f"{result['corpus']['sha256'][:16]}, {result['corpus']['chars']} characters "
          f"({result['corpus']['held_out_chars']} held out). Base: held-out NLL "
          f"{base['source_nll']:.3f} nats/char, accuracy {base['source_acc']:.3f}. "
          f"{len(rows)} runs ({result['skipped']} skipped) in {result['seconds']:.0f} s.\n",
          f"## Forgetting at equal target accuracy (target EM >= {result['tau']} x plain LoRA's)\n",
          report.summary_table(rows, key), ""]
    md += ["## The same picks at other seeds (other LoRA init, other draw of training batches)\n",
           report.seed_table(rows, key), ""]
    for sweep, axis in (("proxy", "proxy_batches"), ("rank", "r"), ("length", "steps")):
        md += [f"## Sweep: {axis}\n", report.sweep_table(rows, sweep, axis), ""]
    if pred:
        md += ["## Does the curvature predict forgetting?\n", report.prediction_table(pred), ""]
    md += ["## Every run of the main sweep\n", report.runs_table(rows, "main"), ""]
    (outdir / "results.md").write_text("\n".join(md) + "\n")
    plots = [report.pareto_plot(rows, "main", None, outdir / "pareto_main.png")]
    for sweep, axis in (("proxy", "proxy_batches"), ("rank", "r"), ("length", "steps")):
        plots.append(report.pareto_plot(rows, sweep, axis, outdir / f"pareto_{sweep}.png"))
    if pred:
        plots.append(report.prediction_plot(pred, outdir / "prediction.png"))
    print("\n".join(md))
    print(f"wrote {outdir / 'results.json'}, {outdir / 'results.md'} and {sum(p is not None for p in plots)} plots")
