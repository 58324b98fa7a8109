"""Shared helpers for the benchmark scripts: timing, machine record, JSON output."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

RESULTS = Path(__file__).parent / "results"


def median_seconds(fn, min_run_time: float = 1.0) -> float:
    """Median wall time of fn() from torch.utils.benchmark (warm-up included)."""
    fn()
    return Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time).median


def machine() -> dict:
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                         cwd=Path(__file__).parent).strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "device": "cpu"}


def write(name: str, rows: list[dict], out: str | None = None, **extra) -> Path:
    folder = Path(out) if out else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps({"machine": machine(), **extra, "rows": rows}, indent=2) + "\n")
    return path


def table(rows: list[dict], cols: list[str]) -> str:
    widths = [max(len(c), *(len(f"{r[c]}") for r in rows)) for c in cols]
    line = lambda vals: "| " + " | ".join(f"{v}".rjust(w) for v, w in zip(vals, widths)) + " |"  # noqa
    return "\n".join([line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *(line([r[c] for c in cols]) for r in rows)])
