"""The benchmark scripts run end to end at tiny sizes (their numbers are not checked here)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def _run(script, *args, env=None):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], check=True, cwd=ROOT,
                   env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600)


def test_cpu_benchmarks_smoke(tmp_path):
    _run("bench_penalty_cpu.py", "--layers", "1", "--hidden", "32", "--inter", "48", "--rank", "2",
         "--min-run-time", "0.01", "--out", str(tmp_path))
    _run("bench_capture_cpu.py", "--layers", "1", "--hidden", "32", "--inter", "48", "--batches", "1",
         "--bsz", "2", "--seq", "8", "--repeats", "1", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "cpu_penalty.json").read_text())["rows"]
    assert {r["variant"] for r in rows} == {"diag", "kfac", "tri", "wkfac"}
    assert json.loads((tmp_path / "cpu_capture.json").read_text())["rows"]


def test_packed_benchmark_smoke(tmp_path):
    _run("bench_packed_cpu.py", "--sizes", "96", "--ranks", "4", "--dense-mib", "1", "--tokens", "64",
         "--min-run-time", "0.01", "--out", str(tmp_path))
    res = json.loads((tmp_path / "cpu_packed.json").read_text())
    assert {r["variant"] for r in res["rows"]} == {"kfac", "wkfac"}
    assert res["accumulate"][0]["bytes_packed_over_dense"] == pytest.approx(32 * 32 * 6 / 96**2, abs=1e-4)


def test_kernel_benchmark_smoke(tmp_path):
    _run("bench_kernels.py", "--smoke", "--out", str(tmp_path), env={"TRITON_INTERPRET": "1"})
    res = json.loads((tmp_path / "kernels_smoke.json").read_text())
    assert res["accumulation"] and res["penalty"] and res["ceilings"]["copy_GBps"] > 0
    assert all(r["packed_ms"] > 0 and r["packed_bytes_ratio"] < 0.8 and r["packed_x_floor"] > 0
               and r["packed_bf16_ms"] > 0 and r["unfused_over_fused"] > 0 for r in res["penalty"])


def test_gpu_compile_check_smoke():
    """gpu_compile_check.py's steps (compiled forward, backward through it) on the CPU."""
    _run("gpu_compile_check.py", "--smoke")


def test_packed_diagnosis_smoke(tmp_path):
    _run("diagnose_packed_cpu.py", "--n", "128", "--n-small", "64", "--bundles", "2", "--ranks", "16",
         "--min-run-time", "0.01", "--out", str(tmp_path))
    row = json.loads((tmp_path / "cpu_packed_diagnosis.json").read_text())["rows"][0]
    assert row["packed_GFLOPs"] > 0 and row["cached_GFLOPs"] > 0 and row["rows_split_GFLOPs"] > 0


def test_gpu_e2e_smoke(tmp_path):
    """gpu_e2e.py's every phase (capture per variant with its floor, penalty per storage against a
    training step, curvlinops) on a tiny model on the CPU."""
    _run("gpu_e2e.py", "--smoke", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "gpu_e2e_smoke.json").read_text())["rows"]
    assert not [r for r in rows if "status" in r]
    capture = {r["variant"]: r for r in rows if r["phase"] == "capture"}
    assert set(capture) == {"diag", "kfac", "tri", "wkfac", "curvlinops KFAC"}
    assert all(r["seconds"] > 0 and r["factor_MiB"] > 0 for r in capture.values())
    assert all(r["floor_s"] > 0 for v, r in capture.items() if v != "curvlinops KFAC")
    penalty = {r["storage"]: r for r in rows if r["phase"] == "penalty"}
    assert set(penalty) == {"packed bfloat16", "packed float32", "dense float32", "lowrank k=8 bfloat16"}
    assert penalty["lowrank k=8 bfloat16"]["factor_MiB"] < penalty["packed bfloat16"]["factor_MiB"] \
        < penalty["packed float32"]["factor_MiB"] < penalty["dense float32"]["factor_MiB"]
    assert all(r["vs_step"] > 0 for r in penalty.values())


def test_pytest_benchmarks_run(tmp_path):
    """benchmarks/test_cpu_micro.py (the pytest-benchmark suite of make bench), each case once."""
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                          str(ROOT / "benchmarks" / "test_cpu_micro.py")], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0 and " passed" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]


def test_lowrank_study_smoke(tmp_path):
    """lowrank_study.py's memory, fidelity, speed and capture parts on tiny shapes."""
    _run("lowrank_study.py", "--smoke", "--out", str(tmp_path))
    res = json.loads((tmp_path / "lowrank.json").read_text())
    mem = res["memory"][0]
    assert 0 < mem["k8_bf16_GB"] < mem["k8_fp32_GB"] < mem["dense_fp32_GB"]
    assert res["fidelity"]["errors"] and res["fidelity"]["outcome"]
    assert {r["storage"] for r in res["speed"]} >= {"dense (reference)", "packed (C++)"}
    assert (tmp_path / "spectra.png").stat().st_size > 0
