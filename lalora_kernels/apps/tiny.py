"""Small Llama + peft LoRA models built from configs, and synthetic batches (no downloads).

Used by the CLI's default run, the benchmarks and the tests.
"""
from __future__ import annotations

from typing import Sequence

import torch

ALL_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(*, hidden: int = 64, inter: int = 128, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               vocab: int = 128, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A randomly initialised ``LlamaForCausalLM`` built from a config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=1024, attention_dropout=0.0, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(dtype)


def add_lora(base, *, r: int = 8, alpha: int = 16, targets: Sequence[str] = ALL_PROJ,
             nonzero_b: float = 0.0, rslora: bool = False, dropout: float = 0.0, init_lora_weights=True):
    """Wrap ``base`` with peft LoRA.

    nonzero_b: if > 0, lora_B is drawn from N(0, nonzero_b^2) instead of peft's zero init, so the
    A block and the cross block of the curvature are non-zero (SPEC section 5).
    """
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout,
                      use_rslora=rslora, init_lora_weights=init_lora_weights)
    model = get_peft_model(base, lcfg)
    if nonzero_b > 0:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, nonzero_b)
    return model


def llama_lora(*, hidden: int = 64, inter: int = 128, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               vocab: int = 128, dtype: torch.dtype = torch.float32, seed: int = 0, **lora):
    """``add_lora(tiny_llama(...), **lora)``."""
    base = tiny_llama(hidden=hidden, inter=inter, layers=layers, heads=heads, kv_heads=kv_heads,
                      vocab=vocab, dtype=dtype, seed=seed)
    return add_lora(base, **lora)


def random_batches(n: int, bsz: int, seq: int, vocab: int, *, pad: bool = True, seed: int = 1):
    """HF-style dicts of random tokens; with ``pad`` each row is right-padded to a random length."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (bsz, seq), generator=g)
        mask = torch.ones(bsz, seq, dtype=torch.long)
        if pad:
            lengths = torch.randint(2, seq + 1, (bsz,), generator=g)
            mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out
