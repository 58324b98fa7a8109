"""The main job runs end to end and LaLoRA keeps the source task better than plain LoRA."""
import json
import warnings

from lalora_kernels.cli import main


def test_demo_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "demo.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["demo", "--steps", "20", "--lam", "0.1", "--no-progress", "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["factor_bytes"] > 0 and res["curvature_seconds"] > 0
    r = res["results"]
    assert r["lalora"]["source_loss"] < r["lora"]["source_loss"]
    assert r["lalora"]["penalty_lam1"] < r["lora"]["penalty_lam1"]
    assert "plain LoRA vs LaLoRA" in capsys.readouterr().out
