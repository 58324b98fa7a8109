"""The source side of ``lalora experiment``: a real corpus nobody here wrote, and a small Llama
pre-trained on it.

The corpus is the English prose of Python's own documentation as the standard library ships it
(``pydoc_data/topics.py``: the language reference's topics, the text ``help()`` shows), read
character by character. It is on every machine with Python and needs no download; its content hash
and the Python version it came from are recorded with every result, since another Python ships
other text. Topics are split into a training part (pre-training and the curvature's proxy batches)
and a held-out part (every eighth topic) on which forgetting is measured.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from functools import lru_cache
from pathlib import Path

import torch

from ...version import __version__
from ..tiny import tiny_llama

EVAL_EVERY = 8                              # every 8th topic (sorted by name) is held out
BASE = dict(hidden=128, inter=384, layers=4, heads=4, kv_heads=2)
PRETRAIN = dict(steps=1500, lr=3e-3, bsz=32, seq=128, seed=0, warmup=50)


@lru_cache(maxsize=1)
def topics() -> dict[str, str]:
    import pydoc_data.topics as t
    return {k: t.topics[k] for k in sorted(t.topics)}


def info() -> dict:
    """Where the corpus came from: Python version, content hash, size, split."""
    text = "\n\n".join(topics().values())
    return {"source": "pydoc_data/topics.py (Python's documentation topics, standard library)",
            "python": platform.python_version(), "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "topics": len(topics()), "chars": len(text), "held_out_topics": len(split("eval")),
            "held_out_chars": len(split_text("eval"))}


def split(part: str) -> list[str]:
    keys = list(topics())
    if part not in ("train", "eval"):
        raise ValueError(f"part={part!r}: use 'train' or 'eval'")
    return [k for i, k in enumerate(keys) if (i % EVAL_EVERY == 0) == (part == "eval")]


@lru_cache(maxsize=2)
def split_text(part: str) -> str:
    return "\n\n".join(topics()[k] for k in split(part))


@lru_cache(maxsize=1)
def vocab() -> tuple[str, ...]:
    """Every character of the corpus, sorted; id 0 stands for any other character."""
    return ("\x00",) + tuple(sorted(set("".join(topics().values())) - {"\x00"}))


def encode(text: str) -> torch.Tensor:
    index = {c: i for i, c in enumerate(vocab())}
    return torch.tensor([index.get(c, 0) for c in text], dtype=torch.long)


def decode(ids) -> str:
    v = vocab()
    return "".join(v[int(i)] for i in ids)


@lru_cache(maxsize=2)
def _ids(part: str) -> torch.Tensor:
    return encode(split_text(part))


def source_batches(part: str, n: int, *, bsz: int = 16, seq: int = 128, seed: int = 0) -> list[dict]:
    """``n`` batches of ``bsz`` random windows of ``seq`` characters from one part of the corpus."""
    ids = _ids(part)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq, (n, bsz), generator=g)
    out = []
    for row in starts:
        x = torch.stack([ids[s:s + seq] for s in row.tolist()])
        out.append({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()})
    return out


def _cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    key = hashlib.sha256(json.dumps([BASE, PRETRAIN, info()["sha256"], __version__]).encode()).hexdigest()[:12]
    return root / "lalora_kernels" / f"pydoc-base-{key}"


def pretrained_base(progress: bool = True, steps: int | None = None):
    """A small Llama pre-trained on the corpus's training part (cached; deterministic on one machine).
    ``steps`` overrides the pre-training length (the quick form), cached apart."""
    from tqdm.auto import tqdm
    from transformers import LlamaForCausalLM

    steps = PRETRAIN["steps"] if steps is None else steps
    path = _cache_dir().with_name(_cache_dir().name + ("" if steps == PRETRAIN["steps"] else f"-{steps}"))
    if (path / "config.json").exists():
        return LlamaForCausalLM.from_pretrained(path)
    model = tiny_llama(**BASE, vocab=len(vocab()), seed=PRETRAIN["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"], weight_decay=0.01)
    warm = min(PRETRAIN["warmup"], max(steps // 10, 1))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / warm) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * t / steps)).item()))
    data = source_batches("train", steps, bsz=PRETRAIN["bsz"], seq=PRETRAIN["seq"], seed=PRETRAIN["seed"])
    model.train()
    for b in tqdm(data, desc="pre-training the base on Python's docs (cached)", disable=not progress):
        out = model(input_ids=b["input_ids"], labels=b["labels"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    return model
