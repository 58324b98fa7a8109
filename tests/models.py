"""Tiny peft-wrapped Llama models and synthetic batches for the tests (no downloads)."""
from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(dtype=torch.float64, *, hidden=24, inter=40, layers=2, heads=4, kv_heads=2, vocab=37,
               r=4, targets=ALL_PROJ, nonzero_b=True, rslora=False, seed=0, alpha=8):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=64, attention_dropout=0.0, tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg).to(dtype)
    lcfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.1,
                      use_rslora=rslora)
    model = get_peft_model(base, lcfg)
    if nonzero_b:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3)
    return model


def batches(n=2, bsz=3, seq=7, vocab=37, seed=1, pad=True):
    """HF-style dicts with right padding (attention_mask 0, labels -100 on padding)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (bsz, seq), generator=g)
        mask = torch.ones(bsz, seq, dtype=torch.long)
        if pad:
            for b in range(bsz):
                L = int(torch.randint(2, seq + 1, (1,), generator=g))
                mask[b, L:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out
