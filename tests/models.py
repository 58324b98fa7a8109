"""Test-sized models and batches (thin wrappers over lalora_kernels.tiny with test defaults)."""
import torch

from lalora_kernels.tiny import ALL_PROJ, llama_lora, random_batches

__all__ = ["ALL_PROJ", "tiny_llama", "batches"]


def tiny_llama(dtype=torch.float64, *, hidden=24, inter=40, layers=2, heads=4, kv_heads=2, vocab=37,
               r=4, targets=ALL_PROJ, nonzero_b=True, rslora=False, seed=0):
    return llama_lora(hidden=hidden, inter=inter, layers=layers, heads=heads, kv_heads=kv_heads,
                      vocab=vocab, r=r, alpha=8, targets=targets, dtype=dtype,
                      nonzero_b=0.3 if nonzero_b else 0.0, rslora=rslora, dropout=0.1, seed=seed)


def batches(n=2, bsz=3, seq=7, vocab=37, seed=1, pad=True):
    return random_batches(n, bsz, seq, vocab, pad=pad, seed=seed)
