"""Shared helpers for the benchmark scripts: timing, machine record, JSON output."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved_medians(fns, min_run_time: float = 1.0, min_rounds: int = 5, max_rounds: int = 500) -> list[float]:
    """Median wall time of each of ``fns``, timed in alternation (A B A B ...) after one warm-up call
    each, so that a drift in the machine's speed (shared cores) hits all of them alike."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    while len(times[0]) < max_rounds and (len(times[0]) < min_rounds or min(map(sum, times)) < min_run_time):
        for fn, ts in zip(fns, times):
            ts.append(_seconds(fn))
    return [statistics.median(ts) for ts in times]


def cpu_ceilings(size: int = 4096, copy_mib: int = 512) -> dict:
    """The machine's measured ceilings: fp32 GEMM rate (torch.mm, size^3) and read bandwidth (a sum
    over ``copy_mib`` MiB), best of 5."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    x = torch.randn(copy_mib * 2**20 // 4)
    t_mm, t_rd = (min(_seconds(fn) for _ in range(5)) for fn in (lambda: a @ b, lambda: x.sum()))
    return {"sgemm_GFLOPs": round(2 * size**3 / t_mm / 1e9, 1), "read_GBs": round(x.numel() * 4 / t_rd / 1e9, 1)}


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


def report(name: str, rows: list[dict], out: str | None = None, **extra) -> Path:
    """``write`` the rows, then print them as a table and where they went."""
    path = write(name, rows, out, **extra)
    print(table(rows, list(rows[0])))
    print(f"wrote {path}")
    return path


def table(rows: list[dict], cols: list[str]) -> str:
    widths = [max(len(c), *(len(f"{r[c]}") for r in rows)) for c in cols]
    line = lambda vals: "| " + " | ".join(f"{v}".rjust(w) for v, w in zip(vals, widths)) + " |"  # noqa
    return "\n".join([line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *(line([r[c] for c in cols]) for r in rows)])


def _gloo_worker(rank, world, init_file, fn, args, queue):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rows = fn(rank, world, args)
        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
        if rank == 0:
            queue.put([r for rs in gathered for r in rs])
    finally:
        dist.destroy_process_group()


def on_gloo_ranks(fn, args, world: int = 2) -> list[dict]:
    """Every rank's rows of ``fn(rank, world, args)``, run in ``world`` spawned gloo processes with one
    thread each; sorted by (mode, rank). ``fn`` must be importable (module level)."""
    import torch.multiprocessing as mp
    queue = mp.get_context("spawn").Queue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_gloo_worker, args=(world, os.path.join(tmp, "init"), fn, args, queue), nprocs=world, join=True)
    return sorted(queue.get(), key=lambda r: (r["mode"], r["rank"]))
