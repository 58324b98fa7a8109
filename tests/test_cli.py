"""`lalora demo` end to end: embedded default on a reduced budget, and --model on a saved tiny model."""
import json
import warnings

import pytest
import torch
from problems import tiny_hf_folder

from lalora_kernels.apps.cli import main


def _check_outputs(out, inits, methods):
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    assert {r["init"] for r in rows} == set(inits)
    assert {r["method"] for r in rows} == {"before fine-tuning", "lora", "l2", *methods}
    for r in rows:
        assert 0.0 <= r["source_acc"] <= 1.0 and 0.0 <= r["target_acc"] <= 1.0
    md = (out / "results.md").read_text()
    assert md.startswith("Best source accuracy") and "| init | method |" in md
    assert (out / "pareto.png").stat().st_size > 1000
    return rows


@pytest.mark.slow
def test_demo_quick_reduced_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))   # pre-train from scratch, then cache
    out = tmp_path / "demo"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["demo", "--quick", "--steps", "8", "--lams", "1", "--variants", "kfac", "wkfac",
              "--no-progress", "--out", str(out)])
    rows = _check_outputs(out, ["zero", "pissa"], ["kfac", "wkfac"])
    before = [r for r in rows if r["method"] == "before fine-tuning"]
    assert all(r["source_acc"] > 0.95 for r in before), "the cached base must know the source task"
    kfac = [r for r in rows if r["method"] == "kfac"]
    assert all(r["factor_MiB"] > 0 and r["curv_s"] > 0 for r in kfac)
    assert any((tmp_path / "cache" / "lalora_kernels").glob("demo-base-*/config.json"))


def test_best_table_picks_the_best_run_that_keeps_the_target():
    from lalora_kernels.apps.demo import best_table
    rows = [{"init": "zero", "method": "before fine-tuning", "lam": 0, "source_acc": 1.0, "target_acc": 0.0},
            {"init": "zero", "method": "lora", "lam": 0, "source_acc": 0.01, "target_acc": 1.0},
            {"init": "zero", "method": "kfac", "lam": 1, "source_acc": 0.5, "target_acc": 1.0},
            {"init": "zero", "method": "kfac", "lam": 3, "source_acc": 0.6, "target_acc": 0.99},
            {"init": "zero", "method": "kfac", "lam": 10, "source_acc": 0.9, "target_acc": 0.989},
            {"init": "zero", "method": "diag", "lam": 1, "source_acc": 0.9, "target_acc": 0.5}]
    assert best_table(rows).splitlines()[2:] == ["| lora | 0.010 |", "| kfac | 0.600 (3) |", "| diag | - |"]


def test_demo_on_a_saved_model_and_jsonl(tmp_path):
    model_dir = tmp_path / "model"
    tiny_hf_folder(model_dir)
    src, tgt = tmp_path / "src.jsonl", tmp_path / "tgt.jsonl"
    src.write_text("\n".join(json.dumps({"text": f"the cat sat on mat {k}."[:-2]}) for k in range(8)))
    tgt.write_text("\n".join(json.dumps({"text": "a quick brown fox, " * (1 + k % 3)}) for k in range(10)))
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["demo", "--model", str(model_dir), "--source", str(src), "--target", str(tgt), "--steps", "3",
              "--lams", "1", "--inits", "zero", "--variants", "kfac", "--no-progress", "--out", str(out)])
    _check_outputs(out, ["zero"], ["kfac"])
    assert json.loads((out / "results.json").read_text())["setup"] == str(model_dir)


def test_demo_rejects_bad_files(tmp_path):
    with pytest.raises(SystemExit):
        main(["demo", "--model", str(tmp_path)])           # --source/--target missing
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "x"}\n{"content": "y"}\n')
    from lalora_kernels.apps.demo_files import read_jsonl
    with pytest.raises(ValueError, match="'text' field"):
        read_jsonl(str(bad))


def test_bench_two_smallest_sizes(tmp_path):
    out = tmp_path / "bench"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["bench", "--sizes", "tiny", "small", "--repeats", "1", "--no-peers", "--no-progress",
              "--lowrank", "8", "--out", str(out)])
    res = json.loads((out / "bench.json").read_text())
    low = [r for r in res["rows"] if r["backend"] == "lowrank k=8"]
    assert len(low) == 2 and all(0 < r["factor_MiB"] < r["generic_kfac_MiB"] for r in low)
    rows = [r for r in res["rows"] if r["backend"] == "torch"]
    assert [r["size"] for r in rows] == ["tiny", "small"]
    assert rows[0]["params"] < rows[1]["params"]
    for r in rows:
        assert r["proxy_vs_fwd_bwd"] > 0 and r["penalty_ms"] > 0 and r["peak_MiB"] > 0
        assert 0 < r["factor_MiB"] <= r["generic_kfac_MiB"]
    assert "torch" in res["loglog_slopes"]["proxy_s"]
    assert (out / "cost_vs_params.png").stat().st_size > 1000
    assert (out / "bench.md").read_text().startswith("| size |")


def test_bench_rejects_unknown_size():
    with pytest.raises(ValueError, match="unknown sizes"):
        main(["bench", "--sizes", "gigantic", "--no-progress"])
