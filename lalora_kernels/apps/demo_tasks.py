"""The demo's embedded default: two synthetic next-token tasks and a small Llama pre-trained on one.

* source task: marker S, then tokens 0..K-1 where each next token is the previous one + 1 (mod K);
* target task: marker T, then the same tokens, each next token the previous one + 3 (mod K).

The tasks share their tokens, so a model can hold both only by reading the marker; the cheap
way to learn the target (rewrite the successor map) erases the source.

The base model is pre-trained on the source task by ``pretrained_base`` (deterministic: fixed
seeds, fixed data) and cached in the user cache dir; fine-tuning LoRA on the target task with no
regulariser destroys the source skill, which is what LaLoRA is for.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .tiny import tiny_llama
from ..version import __version__

K = 32                      # content tokens; K and K + 1 are the task markers
BASE = dict(hidden=128, inter=256, layers=2, heads=4, kv_heads=2, vocab=K + 2)
PRETRAIN = dict(steps=200, lr=3e-3, bsz=16, seq=32, seed=0)


def task_batches(task: str, n: int, *, bsz: int = 16, seq: int = 32, seed: int = 0) -> list[dict]:
    """``n`` HF-style batches of the 'source' or 'target' task."""
    step, marker = {"source": (1, K), "target": (3, K + 1)}[task]
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, K, (n, bsz, 1), generator=g)
    body = (start + step * torch.arange(seq - 1)) % K
    ids = torch.cat([torch.full((n, bsz, 1), marker), body], dim=2)
    labels = ids.clone()
    labels[:, :, 1] = -100          # the first content token is random: not a skill
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": y} for x, y in zip(ids, labels)]


def lm_loss(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=-100)


@torch.no_grad()
def accuracy(model, batches) -> float:
    """Next-token accuracy (argmax) over every position that carries a label."""
    hit = total = 0
    for b in batches:
        dev = next(model.parameters()).device
        logits = model(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev)).logits
        target = b["labels"][:, 1:].to(dev)
        live = target != -100
        hit += int(((logits[:, :-1].argmax(-1) == target) & live).sum())
        total += int(live.sum())
    return hit / max(total, 1)


def _cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    key = hashlib.sha256(json.dumps([BASE, PRETRAIN, K, __version__]).encode()).hexdigest()[:12]
    return root / "lalora_kernels" / f"demo-base-{key}"


def pretrained_base(progress: bool = True):
    """The demo's base model, pre-trained on the source task (loaded from the cache when there)."""
    from tqdm.auto import tqdm
    from transformers import LlamaForCausalLM

    path = _cache_dir()
    if (path / "config.json").exists():
        return LlamaForCausalLM.from_pretrained(path)
    model = tiny_llama(**BASE, seed=PRETRAIN["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"])
    data = task_batches("source", PRETRAIN["steps"], bsz=PRETRAIN["bsz"], seq=PRETRAIN["seq"],
                        seed=PRETRAIN["seed"])
    model.train()
    for b in tqdm(data, desc="pre-training the base on the source task", disable=not progress):
        lm_loss(model, b).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    return model
