"""``lalora demo``: the package end to end on an embedded default (no downloads).

A small Llama + LoRA is built from a config; curvature is estimated on proxy batches of a *source*
distribution; LoRA is then fine-tuned on a *target* distribution, once plainly and once with the
LaLoRA penalty, from the same initial state, data and seeds. Printed: curvature cost and memory
(ours vs generic K-FAC on lora_A/lora_B), and per step the task loss, penalty and source loss.
"""
from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F

from .capture import estimate_curvature
from .penalty import LaLoRARegularizer
from .tiny import add_lora, tiny_llama


def _source_batches(n, bsz, seq, vocab, seed):
    """Source task: tokens from the lower half of the vocabulary, each next token = previous + 1."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab // 2, (n, bsz, 1), generator=g)
    ids = (start + torch.arange(seq)) % (vocab // 2)
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()} for x in ids]


def _target_batches(n, bsz, seq, vocab, seed):
    """Target task: tokens from the upper half, each next token = previous + 3."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab // 2, (n, bsz, 1), generator=g)
    ids = vocab // 2 + (start + 3 * torch.arange(seq)) % (vocab // 2)
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()} for x in ids]


def _loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())


def generic_kfac_bytes(curv) -> int:
    """fp32 bytes generic K-FAC would store treating lora_A and lora_B as separate Linears."""
    return 4 * sum(a.in_features ** 2 + 2 * a.rank ** 2 + a.out_features ** 2 for a in curv.adapters.values())


def run(variant: str = "kfac", lam: float = 0.1, steps: int = 150, init: str = "pissa", seed: int = 0,
        progress: bool = True) -> dict:
    vocab, seq, bsz = 128, 32, 8
    base = tiny_llama(hidden=128, inter=256, layers=2, vocab=vocab, seed=seed)
    print("[1/3] pre-training the base model on the source task (60 steps)")
    base_opt = torch.optim.AdamW(base.parameters(), lr=3e-3)
    src = _source_batches(60, bsz, seq, vocab, seed)
    for b in src:
        _loss(base, b).backward()
        base_opt.step()
        base_opt.zero_grad()
    model = add_lora(base, r=8, init_lora_weights=True if init == "zero" else init)
    proxy, held_out = src[:4], _source_batches(4, bsz, seq, vocab, seed + 1)
    target = _target_batches(steps, bsz, seq, vocab, seed + 2)

    print(f"[2/3] estimating '{variant}' curvature on {len(proxy)} proxy batches")
    t0 = time.perf_counter()
    curv = estimate_curvature(model, proxy, variant=variant, progress=progress)
    t_curv = time.perf_counter() - t0
    ours, generic = curv.memory_bytes(), generic_kfac_bytes(curv)
    print(f"      {curv}")
    print(f"      time {t_curv:.2f}s, factor memory {ours / 2**20:.3f} MiB "
          f"(generic K-FAC on lora_A/lora_B: {generic / 2**20:.3f} MiB)")

    print(f"[3/3] fine-tuning on the target task, {steps} steps: plain LoRA vs LaLoRA (lam={lam})")
    results = {}
    for name, lam_k in (("lora", 0.0), ("lalora", lam)):
        m = copy.deepcopy(model)
        reg = LaLoRARegularizer(curv, lam=lam_k)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=5e-3)
        for step, b in enumerate(target):
            task = _loss(m, b)
            pen = reg(m)
            (task + pen).backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            src_loss = sum(float(_loss(m, b)) for b in held_out) / len(held_out)
            tgt_loss = sum(float(_loss(m, b)) for b in target[-4:]) / 4
            pen = float(LaLoRARegularizer(curv, lam=1.0)(m))
        results[name] = {"source_loss": src_loss, "target_loss": tgt_loss, "penalty_lam1": pen}
    with torch.no_grad():
        before = sum(float(_loss(model, b)) for b in held_out) / len(held_out)
    print(f"\n  source loss before fine-tuning: {before:.4f}")
    print(f"  {'method':8s} {'source loss':>12s} {'target loss':>12s} {'penalty (lam=1)':>16s}")
    for name, r in results.items():
        print(f"  {name:8s} {r['source_loss']:12.4f} {r['target_loss']:12.4f} {r['penalty_lam1']:16.4g}")
    return {"variant": variant, "lam": lam, "curvature_seconds": t_curv, "factor_bytes": ours,
            "generic_kfac_bytes": generic, "source_loss_before": before, "results": results}
