"""``lalora demo --model PATH --source FILE --target FILE``: the comparison on a user's model and text.

PATH is a local Hugging Face causal-LM folder (model and tokenizer, as ``save_pretrained`` writes
them); FILE is JSON lines with a ``text`` field. Source lines are split into proxy batches (the
curvature) and held-out batches (source accuracy); target lines into training batches (cycled to
``steps``) and held-out batches (target accuracy). Runs on the GPU when there is one.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from .demo import Setup
from .tiny import ALL_PROJ


def read_jsonl(path: str) -> list[str]:
    texts = []
    with open(path) as f:
        for k, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{k}: each line must be a JSON object with a 'text' field ({e})")
    if len(texts) < 2:
        raise ValueError(f"{path} holds {len(texts)} usable lines; give at least 2 (one to fit, one to test)")
    return texts


def _batches(tok, texts: Sequence[str], bsz: int, max_len: int) -> list[dict]:
    out = []
    for k in range(0, len(texts), bsz):
        enc = tok(list(texts[k:k + bsz]), return_tensors="pt", padding=True, truncation=True,
                  max_length=max_len)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return out


def file_setup(model_path: str, source: str, target: str, *, steps: int = 100, bsz: int = 8, max_len: int = 128,
               targets: Optional[Sequence[str]] = None) -> Setup:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(model_path) / "config.json").exists():
        raise ValueError(f"--model {model_path!r} is not a Hugging Face model folder (no config.json)")
    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "right"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_path).to(device).eval()
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = tuple(targets) if targets else tuple(p for p in ALL_PROJ if p in names)
    if not targets:
        raise ValueError(f"none of {ALL_PROJ} is a Linear layer of this model; name the layers to adapt "
                         "with --targets")
    src, tgt = read_jsonl(source), read_jsonl(target)
    n_proxy = max(1, len(src) // 4)
    n_train = max(1, (4 * len(tgt)) // 5)
    train = _batches(tok, tgt[:n_train], bsz, max_len)   # cycled to ``steps`` by demo.run
    return Setup(base=lambda: copy.deepcopy(model), proxy=_batches(tok, src[:n_proxy], bsz, max_len),
                 train=train,
                 eval_source=_batches(tok, src[n_proxy:], bsz, max_len),
                 eval_target=_batches(tok, tgt[n_train:], bsz, max_len), device=device, targets=targets,
                 name=str(model_path), info={"source": source, "target": target, "device": device})
