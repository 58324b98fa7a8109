"""Tables and plots of ``lalora experiment``.

"At equal target accuracy": in each setting, a method's runs that reach at least ``TAU`` times plain
LoRA's exact match in that setting; of those, the one that forgot least (the smallest increase of
the held-out source NLL). ``kept`` is the share of plain LoRA's forgetting avoided."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

TAU = 0.95


def _key(r: dict) -> tuple:
    return (r["r"], r["steps"], r["proxy_batches"], r.get("seed", 0))


def best_at_equal_target(rows: list[dict], tau: float = TAU) -> dict:
    """(method, setting) -> the qualifying run that forgot least (None if no run qualifies)."""
    done = [r for r in rows if "skipped" not in r]
    lora = {_key(r): r for r in done if r["method"] == "lora"}
    out = {}
    for r in done:
        ref = lora.get(_key(r))
        if ref is None:
            continue
        k = (r["method"], _key(r))
        ok = r["target_em"] >= tau * ref["target_em"]
        if ok and (out.get(k) is None or r["forgetting"] < out[k]["forgetting"]):
            out[k] = {**r, "kept": 1 - r["forgetting"] / ref["forgetting"] if ref["forgetting"] > 0 else None}
        else:
            out.setdefault(k, None)
    return out


def _cell(best: Optional[dict], strength=True) -> str:
    if best is None:
        return "-"
    s = f"{best['forgetting']:.3f}"
    if best.get("kept") is not None and best["method"] != "lora":
        s += f" ({100 * best['kept']:.0f}%)"
    if strength and best["strength"]:
        s += f" @{best['strength']:g}"
    return s


def summary_table(rows: list[dict], setting_key: tuple) -> str:
    best = best_at_equal_target(rows)
    methods = list(dict.fromkeys(r["method"] for r in rows if r["sweep"] == "main"))
    head = ("| method | source NLL increase (share of LoRA's forgetting avoided) @strength | target EM | "
            "source acc |\n|---|---|---|---|")
    body = []
    for m in methods:
        b = best.get((m, setting_key))
        body.append(f"| {m} | {_cell(b)} | " + ("-" if b is None else f"{b['target_em']:.3f} | {b['source_acc']:.3f}")
                    + (" | -" if b is None else "") + " |")
    return "\n".join([head, *body])


def sweep_table(rows: list[dict], sweep: str, axis: str) -> str:
    best = best_at_equal_target(rows)
    sub = [r for r in rows if r["sweep"] == sweep]
    values = sorted({r[axis] for r in sub})
    methods = list(dict.fromkeys(r["method"] for r in sub))
    head = f"| method | " + " | ".join(f"{axis} = {v}" for v in values) + " |\n|---|" + "---|" * len(values)
    body = []
    for m in methods:
        cells = []
        for v in values:
            keys = {_key(r) for r in sub if r[axis] == v}
            cells.append(_cell(next((best[(m, k)] for k in keys if best.get((m, k))), None)))
        body.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join([head, *body])


def runs_table(rows: list[dict], sweep: str) -> str:
    """Every run of one sweep: the frontier each method traces, skipped runs included."""
    head = "| method | strength | target EM | source NLL increase | source acc | s |\n|---|---|---|---|---|---|"
    body = []
    for r in rows:
        if r["sweep"] != sweep:
            continue
        if "skipped" in r:
            body.append(f"| {r['method']} | {r['strength']:g} | skipped ({r['skipped']}) | | | |")
        else:
            body.append(f"| {r['method']} | {r['strength']:g} | {r['target_em']:.3f} | {r['forgetting']:.3f} | "
                        f"{r['source_acc']:.3f} | {r['seconds']:.0f} |")
    return "\n".join([head, *body])


def seed_table(rows: list[dict], setting_key: tuple) -> str:
    """Each method's seed-0 pick (``best_at_equal_target``) rerun at other seeds, same strength: the
    spread a single-seed table hides. Kept share against plain LoRA at the same seed."""
    best = best_at_equal_target(rows)
    sub = [r for r in rows if r["sweep"] == "seeds" and "skipped" not in r]
    seeds = sorted({r["seed"] for r in sub} | {0})
    head = "| method @strength | " + " | ".join(f"seed {k}: NLL increase (kept), EM" for k in seeds) + \
        " |\n|---|" + "---|" * len(seeds)
    body = []
    for m in dict.fromkeys(r["method"] for r in rows if r["sweep"] == "main"):
        b0 = best.get((m, setting_key))
        if b0 is None:
            continue
        cells = []
        for k in seeds:
            key = setting_key[:3] + (k,)
            r = b0 if k == 0 else next((x for x in sub if x["method"] == m and _key(x) == key), None)
            ref = best.get(("lora", key))
            if r is None or ref is None:
                cells.append("-")
                continue
            kept = 1 - r["forgetting"] / ref["forgetting"] if ref["forgetting"] > 0 and m != "lora" else None
            cells.append(f"{r['forgetting']:.3f}" + ("" if kept is None else f" ({100 * kept:.0f}%)")
                         + f", {r['target_em']:.3f}")
        body.append(f"| {m}" + (f" @{b0['strength']:g}" if b0["strength"] else "") + " | " + " | ".join(cells) + " |")
    return "\n".join([head, *body])


def prediction_table(pred: list[dict]) -> str:
    head = "| init | variant | Spearman, random | ratio, random | Spearman, trajectory | ratio, trajectory |\n" \
           "|---|---|---|---|---|---|"
    body = []
    for init in dict.fromkeys(p["init"] for p in pred):
        for v in dict.fromkeys(p["variant"] for p in pred):
            by = {p["points"]: p for p in pred if p["init"] == init and p["variant"] == v}
            if not by:
                continue
            cells = []
            for kind in ("random", "trajectory"):
                p = by[kind]
                cells += [f"{p['spearman']:.2f}", "-" if p["median_ratio"] is None else f"{p['median_ratio']:.3g}"]
            body.append(f"| {init} | {v} | " + " | ".join(cells) + " |")
    return "\n".join([head, *body])


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib is not installed (pip install 'lalora_kernels[plot]'): no plots written")
        return None


def pareto_plot(rows: list[dict], sweep: str, axis: Optional[str], path: Path) -> Optional[Path]:
    """Forgotten against learnt, one line per method along its strength grid; a log-like y axis
    (symlog) since forgetting spans three decades."""
    plt = _plt()
    if plt is None:
        return None
    sub = [r for r in rows if r["sweep"] == sweep and "skipped" not in r]
    values = sorted({r[axis] for r in sub}) if axis else [None]
    methods = list(dict.fromkeys(r["method"] for r in sub))
    colours = plt.get_cmap("tab20")
    fig, axes = plt.subplots(1, len(values), figsize=(5.0 * len(values) + 2.4, 4.6), squeeze=False)
    for ax, v in zip(axes[0], values):
        here = [r for r in sub if axis is None or r[axis] == v]
        for i, m in enumerate(methods):
            pts = sorted((r for r in here if r["method"] == m), key=lambda r: r["strength"])
            if not pts:
                continue
            single = len(pts) == 1
            ax.plot([p["target_em"] for p in pts], [p["forgetting"] for p in pts],
                    "*" if single else ("s-" if "pissa" in m else "o-"), color=colours(i % 20), label=m,
                    markersize=11 if single else 3.5, lw=1)
        ax.set_yscale("symlog", linthresh=0.01)
        ax.set_xlabel("target exact match (learnt)")
        ax.set_ylabel("held-out source NLL increase, nats/char (forgotten)")
        ax.set_title(sweep if axis is None else f"{sweep}: {axis} = {v}")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def prediction_plot(pred: list[dict], path: Path) -> Optional[Path]:
    plt = _plt()
    if plt is None:
        return None
    inits = list(dict.fromkeys(p["init"] for p in pred))
    variants = list(dict.fromkeys(p["variant"] for p in pred))
    fig, axes = plt.subplots(len(inits), len(variants), figsize=(3.6 * len(variants), 3.4 * len(inits)),
                             squeeze=False)
    for i, init in enumerate(inits):
        for j, v in enumerate(variants):
            ax = axes[i][j]
            for kind, marker in (("random", "o"), ("trajectory", "^")):
                p = next(q for q in pred if q["init"] == init and q["variant"] == v and q["points"] == kind)
                ax.scatter([max(x, 1e-6) for x in p["measured"]], [max(x, 1e-6) for x in p["predicted"]],
                           s=12, marker=marker, label=f"{kind} (rho {p['spearman']:.2f})")
            ax.set_xscale("log")
            ax.set_yscale("log")
            lo, hi = ax.get_xlim()
            ax.plot([lo, hi], [lo, hi], "k:", lw=0.8)
            ax.set_title(f"{v}, {init} init", fontsize=9)
            ax.set_xlabel("measured NLL increase", fontsize=8)
            ax.set_ylabel("predicted 1/2 d'Fd", fontsize=8)
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
