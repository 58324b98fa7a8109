"""The target skill of ``lalora experiment`` and the two sides' metrics.

Target: upper-casing a random five-letter string written as text, ``"qzkfa -> QZKFA"``, several
examples per row. The base has never seen the ``->`` instruction (the corpus has no such lines), the
strings are random (no word to recall), and the skill needs attention to copy five positions back
through a learnt character map: plain LoRA learns it, and has every reason to bend the character
statistics the source relies on. Exact match per example: all five answer characters are the argmax
under teacher forcing, which is what greedy decoding would produce.

Source: next-character negative log-likelihood (nats per character) and accuracy on the held-out
topics; forgetting is the NLL's increase over the base.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..demo_tasks import lm_loss  # noqa: F401  (the runs' loss: the demo's)
from .corpus import encode

LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORD = 5
ARROW = " -> "
PER_ROW = 4


def _example(g: torch.Generator) -> tuple[str, str]:
    word = "".join(LETTERS[i] for i in torch.randint(0, 26, (WORD,), generator=g).tolist())
    return word + ARROW, word.upper() + "\n"


def target_batches(n: int, *, bsz: int = 16, seed: int = 0) -> list[dict]:
    """``n`` batches of rows of ``PER_ROW`` examples; labels only on the answers (and their newline)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        rows, labels = [], []
        for _ in range(bsz):
            ids, lab = [], []
            for _ in range(PER_ROW):
                prompt, answer = _example(g)
                p, a = encode(prompt), encode(answer)
                ids += [p, a]
                lab += [torch.full_like(p, -100), a]
            rows.append(torch.cat(ids))
            labels.append(torch.cat(lab))
        x, y = torch.stack(rows), torch.stack(labels)
        out.append({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": y})
    return out


@torch.no_grad()
def exact_match(model, batches) -> float:
    """Share of examples whose five answer letters are all predicted (argmax, teacher-forced)."""
    hit = total = 0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        target = b["labels"][:, 1:]
        ok = (logits.argmax(-1) == target) | (target == -100)
        ok = torch.cat([torch.ones_like(ok[:, :1]), ok], dim=1)         # position 0 carries no label
        per = ok.reshape(ok.shape[0], PER_ROW, -1)[..., :-1]            # drop the newline's position
        hit += int(per.all(-1).sum())
        total += per.shape[0] * per.shape[1]
    return hit / max(total, 1)


@torch.no_grad()
def source_metrics(model, batches) -> dict:
    """Held-out next-character NLL (nats per character) and accuracy."""
    nll = hit = total = 0.0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        target = b["labels"][:, 1:]
        nll += float(F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum"))
        hit += float((logits.argmax(-1) == target).sum())
        total += target.numel()
    return {"source_nll": nll / total, "source_acc": hit / total}
