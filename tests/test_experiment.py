"""``lalora experiment``: its pieces (corpus split, target metric, MIGU, rank correlation) checked
against hand-built cases, and the quick form end to end."""
import json

import pytest
import torch
from scipy.stats import spearmanr

from lalora_kernels.apps.experiment import corpus, tasks
from lalora_kernels.apps.experiment.peers import MIGU
from lalora_kernels.apps.experiment.predict import spearman


def test_corpus_is_pinned_and_its_split_disjoint():
    info = corpus.info()
    assert len(info["sha256"]) == 64 and info["chars"] > 100_000
    train, held = set(corpus.split("train")), set(corpus.split("eval"))
    assert train and held and not train & held and train | held == set(corpus.topics())
    text = corpus.split_text("eval")[:500]
    assert corpus.decode(corpus.encode(text)) == text


class _Oracle(torch.nn.Module):
    """Logits that put all mass on the batch's own labels, except where ``wrong`` says."""

    def __init__(self, labels, wrong=()):
        super().__init__()
        self.labels, self.wrong = labels, wrong

    def forward(self, input_ids, attention_mask):
        n = len(corpus.vocab())
        target = self.labels[:, 1:].clamp_min(0)
        logits = torch.nn.functional.one_hot(target, n).float()
        for row, pos in self.wrong:
            logits[row, pos] = torch.roll(logits[row, pos], 1)
        logits = torch.cat([logits, torch.zeros_like(logits[:, :1])], dim=1)
        return type("Out", (), {"logits": logits})()


def test_exact_match_counts_whole_answers():
    b = tasks.target_batches(1, bsz=2, seed=0)[0]
    assert tasks.exact_match(_Oracle(b["labels"]), [b]) == 1.0
    answer = [p for p in range(b["labels"].shape[1] - 1) if b["labels"][0, p + 1] != -100]
    # one wrong letter spoils one of the 8 examples; a wrong newline spoils none
    assert tasks.exact_match(_Oracle(b["labels"], [(0, answer[0])]), [b]) == 7 / 8
    newline = answer[tasks.WORD]
    assert tasks.exact_match(_Oracle(b["labels"], [(0, newline)]), [b]) == 1.0


def test_migu_keeps_the_rows_with_the_largest_outputs():
    from lalora_kernels.apps.tiny import llama_lora
    model = llama_lora(hidden=32, inter=48, layers=1, vocab=len(corpus.vocab()), r=4, nonzero_b=0.1)
    migu = MIGU(model, ratio=0.25)
    b = tasks.target_batches(1, bsz=2)[0]
    tasks.lm_loss(model, b).backward()
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    mag = migu.magnitude[layer.lora_B["default"].weight].clone()
    migu.mask_gradients()
    g = layer.lora_B["default"].weight.grad
    kept = set(torch.nonzero(g.abs().sum(1)).flatten().tolist())
    assert kept == set(mag.topk(round(0.25 * mag.numel())).indices.tolist())
    assert len(kept) == 8
    migu.remove()


def test_spearman_matches_scipy():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, generator=g).tolist(), torch.randn(30, generator=g).tolist()
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-6)
    assert spearman(x, [2 * v for v in x]) == pytest.approx(1.0)


def test_quick_experiment(tmp_path, monkeypatch):
    from lalora_kernels.apps.cli import main
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    main(["experiment", "--quick", "--out", str(tmp_path / "out"), "--no-progress"])
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["skipped"] == 0 and res["corpus"]["sha256"] == corpus.info()["sha256"]
    methods = {r["method"] for r in res["rows"] if r["sweep"] == "main"}
    assert {"lora", "l2", "mica", "corda-kpm", "corda-kpm+lalora-kfac", "migu"} <= methods
    assert {f"lalora-{v} ({i})" for v in ("diag", "kfac", "tri", "wkfac") for i in ("zero", "pissa")} <= methods
    assert {r["sweep"] for r in res["rows"]} == {"main", "proxy", "rank", "length", "seeds"}
    assert {r["seed"] for r in res["rows"] if r["sweep"] == "seeds"} == {1}
    for r in res["rows"]:
        assert 0 <= r["target_em"] <= 1 and r["source_nll"] > 0
    assert {(p["init"], p["variant"]) for p in res["prediction"]} >= {("zero", "wkfac"), ("pissa", "kfac")}
    for name in ("results.md", "pareto_main.png", "pareto_proxy.png", "pareto_rank.png", "pareto_length.png",
                 "prediction.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    # --resume keeps every finished run (nothing reruns: the rows are the same to the last digit)
    main(["experiment", "--quick", "--out", str(tmp_path / "out"), "--no-progress", "--resume"])
    again = json.loads((tmp_path / "out" / "results.json").read_text())
    assert again["rows"] == res["rows"] and again["prediction"] == res["prediction"]
    assert again["seconds"] >= res["seconds"]
