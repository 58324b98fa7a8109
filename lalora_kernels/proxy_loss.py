"""What a proxy pass feeds the model and differentiates: the model's own inputs and loss, per model
family (SPEC section 2).

| family | model classes | scores | targets | valid tokens (streams) |
|---|---|---|---|---|
| ``causal_lm`` | ``*ForCausalLM``, ``*LMHeadModel`` | logits at t | label at t + 1 (HF shift) | ``attention_mask`` |
| ``seq2seq_lm`` | encoder-decoder ``*ForConditionalGeneration`` (BART, T5, ...) | decoder logits at t | label at t (the model shifts its decoder input) | encoder: ``attention_mask``; decoder: ``decoder_attention_mask``, else positions with a label |
| ``sequence_classification`` | ``*ForSequenceClassification`` | one row of logits per example | the example's label (regression: a value) | ``attention_mask``; a layer on pooled rows sees one token per example |
| ``token_classification`` | ``*ForTokenClassification`` | logits at t | label at t | ``attention_mask`` |

The loss is summed over loss-carrying positions (label -100 carries none): cross-entropy, or for
single-output regression the Gaussian ``1/2 (f - y)^2``; ``fisher="mc"`` draws the targets from the
model's own predictive distribution instead. Any other model, or another loss, goes through
``loss_fn(model_output, batch) -> scalar`` (summed over tokens, empirical Fisher). Every key of the
batch that the model's forward accepts is passed on (``position_ids`` of packed batches, pixel
values, ...); a seq2seq model gets its decoder input built by its own
``prepare_decoder_input_ids_from_labels`` when the batch has labels but no decoder input.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

FAMILIES = ("causal_lm", "seq2seq_lm", "sequence_classification", "token_classification")
SUFFIXES = (("ForCausalLM", "causal_lm"), ("LMHeadModel", "causal_lm"), ("ForConditionalGeneration", "seq2seq_lm"),
            ("ForSeq2SeqLM", "seq2seq_lm"), ("ForSequenceClassification", "sequence_classification"),
            ("ForTokenClassification", "token_classification"))
CROSS_ATTENTION_INPUTS = ("encoder_attn.k_proj", "encoder_attn.v_proj", "EncDecAttention.k", "EncDecAttention.v",
                          "crossattention.self.key", "crossattention.self.value")


def base_of(model: nn.Module) -> nn.Module:
    """The transformers model inside peft's wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def family_of(model: nn.Module) -> Optional[str]:
    base = base_of(model)
    name = type(base).__name__
    fam = next((f for suffix, f in SUFFIXES if name.endswith(suffix)), None)
    if fam == "seq2seq_lm" and not getattr(getattr(base, "config", None), "is_encoder_decoder", False):
        fam = "causal_lm" if "CausalLM" in name else None
    return fam


@dataclass
class Prepared:
    """One batch ready for the forward: its kwargs, the valid-token masks of each stream (bool,
    flattened), and the targets."""
    kwargs: dict
    streams: dict[str, torch.Tensor] = field(default_factory=dict)
    labels: Optional[torch.Tensor] = None
    batch: object = None


class ProxyLoss:
    """The family's input preparation, scores and summed loss (module docstring)."""

    def __init__(self, model: nn.Module, loss_fn: Optional[Callable] = None):
        self.model, self.loss_fn = model, loss_fn
        self.base = base_of(model)
        self.family = family_of(model)
        if self.family is None and loss_fn is None:
            raise ValueError(f"{type(self.base).__name__} is not a model family the proxy pass knows "
                             f"({', '.join(FAMILIES)}); pass loss_fn=lambda output, batch: <summed loss> to "
                             "estimate_curvature")
        config = getattr(self.base, "config", None)
        self.regression = self.family == "sequence_classification" and (
            getattr(config, "problem_type", None) == "regression" or getattr(config, "num_labels", 2) == 1)
        if self.family == "sequence_classification" and getattr(config, "problem_type", None) == \
                "multi_label_classification" and loss_fn is None:
            raise ValueError("multi-label classification has no built-in proxy loss here; pass loss_fn (e.g. "
                             "the summed BCE-with-logits of output.logits and batch['labels'])")
        self.accepts = set(inspect.signature(self.base.forward).parameters)
        emb = self.base.get_input_embeddings() if hasattr(self.base, "get_input_embeddings") else None
        self.vocab = getattr(emb, "num_embeddings", None)

    # -- input ----------------------------------------------------------------------------------
    def prepare(self, batch, device) -> Prepared:
        if isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, torch.Tensor) for t in batch):
            batch = {"input_ids": batch[0], "labels": batch[1]}
        if not isinstance(batch, Mapping):
            raise ValueError("each batch must be a dict of model inputs (input_ids, attention_mask, labels, ...) or "
                             f"a tuple (input_ids, labels); got {type(batch).__name__}")
        if "input_ids" not in batch:
            raise ValueError(f"a batch dict must hold 'input_ids' (got keys {sorted(batch)})")
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        ids, labels = batch["input_ids"], batch.get("labels")
        self._check_ids(ids)
        mask = batch.get("attention_mask")
        if mask is not None and tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but input_ids has {tuple(ids.shape)}; "
                             "they must match")
        if labels is not None and self.family in ("causal_lm", "token_classification") and \
                tuple(labels.shape) != tuple(ids.shape):
            raise ValueError(f"labels has shape {tuple(labels.shape)} but input_ids has {tuple(ids.shape)}; they "
                             "must match (one label per token, -100 where none)")
        if labels is not None and self.family == "sequence_classification" and labels.shape[:1] != ids.shape[:1]:
            raise ValueError(f"labels has shape {tuple(labels.shape)}; a sequence classifier takes one label per "
                             f"example ({ids.shape[0]})")
        kwargs = {k: v for k, v in batch.items() if k in self.accepts and k != "labels"}
        if "use_cache" in self.accepts:
            kwargs["use_cache"] = False
        if self.family == "causal_lm" and mask is None and "position_ids" in batch:
            packed = self._packed_mask(batch["position_ids"])
            if packed is not None:
                kwargs["attention_mask"] = packed
        valid = (torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()).reshape(-1)
        streams = {"encoder": valid}
        if self.family == "seq2seq_lm":
            if "decoder_input_ids" not in kwargs:
                if labels is None:
                    raise ValueError("a seq2seq proxy batch needs labels (or decoder_input_ids) for the decoder")
                build = getattr(self.base, "prepare_decoder_input_ids_from_labels", None)
                if build is None:
                    kwargs["labels"] = labels
                else:
                    kwargs["decoder_input_ids"] = build(labels=labels)
            dec = kwargs.get("decoder_input_ids", labels)
            dmask = batch.get("decoder_attention_mask")
            streams["decoder"] = (dmask.bool() if dmask is not None else labels != -100 if labels is not None
                                  else torch.ones_like(dec, dtype=torch.bool)).reshape(-1)
        if self.family == "sequence_classification":
            streams["example"] = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
        return Prepared(kwargs, streams, labels, batch)

    def _packed_mask(self, position_ids: torch.Tensor) -> Optional[torch.Tensor]:
        """For a padding-free batch (several sequences in one row, ``position_ids`` restarting at each):
        the additive 4-D mask that keeps each sequence causal and blind to the others, so that eager
        and SDPA attention compute what the sequences give one by one. Flash attention separates the
        sequences from ``position_ids`` itself (None: nothing to add)."""
        impl = str(getattr(getattr(self.base, "config", None), "_attn_implementation", ""))
        restarts = position_ids[:, 1:] <= position_ids[:, :-1]
        if impl.startswith("flash") or not bool(restarts.any()):
            return None
        segment = torch.cat([torch.zeros_like(position_ids[:, :1]), restarts.long().cumsum(1)], 1)
        L = position_ids.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=position_ids.device).tril()
        allowed = (segment[:, :, None] == segment[:, None, :]) & causal
        dtype = next(self.base.parameters()).dtype
        blocked = torch.full(allowed.shape, torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
        return torch.where(allowed, torch.zeros((), dtype=dtype, device=allowed.device), blocked)[:, None]

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(ids.shape)}")
        if ids.numel() == 0:
            raise ValueError(f"input_ids has shape {tuple(ids.shape)}: a batch needs at least one sequence of at "
                             "least one token")
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must hold integer token ids, got {ids.dtype}")
        if self.vocab is not None and (int(ids.max()) >= self.vocab or int(ids.min()) < 0):
            raise ValueError(f"input_ids holds token ids from {int(ids.min())} to {int(ids.max())} but the model's "
                             f"embedding has {self.vocab} rows: tokenize with the model's own tokenizer")

    def stream_of(self, name: str, rows: int, streams: dict[str, torch.Tensor]) -> str:
        """Which stream's tokens a LoRA layer's rows are: by count, and by name where counts tie (a
        decoder layer's cross-attention keys and values read the encoder's tokens)."""
        fits = [s for s, m in streams.items() if m.numel() == rows]
        if len(fits) == 1:
            return fits[0]
        if not fits:
            raise RuntimeError(f"LoRA layer {name!r} saw {rows} token rows but the batch's streams have "
                               f"{ {s: m.numel() for s, m in streams.items()} }; sequence packing inside the model "
                               "is not supported")
        decoder = ("decoder." in name or name.startswith("decoder")) and not any(c in name for c in
                                                                                  CROSS_ATTENTION_INPUTS)
        return "decoder" if decoder and "decoder" in fits else "encoder" if "encoder" in fits else fits[0]

    # -- loss -----------------------------------------------------------------------------------
    def backward(self, output, p: Prepared, fisher: str, mc_samples: int, generator, on_sample: Callable) -> None:
        """Backpropagate the summed loss (``fisher='empirical'``) or ``mc_samples`` losses with
        targets drawn from the model (``'mc'``); ``on_sample(k, weight)`` before each backward."""
        if self.loss_fn is not None:
            if fisher != "empirical":
                raise ValueError("fisher='mc' needs the model's predictive distribution; with loss_fn use "
                                 "fisher='empirical'")
            on_sample(0, 1.0)
            self.loss_fn(output, p.batch).backward()
            return
        scores, target = self._scores(output, p, fisher)
        if fisher == "empirical":
            on_sample(0, 1.0)
            if self.regression:
                (0.5 * (scores.squeeze(-1) - target.to(scores.dtype)).square().sum()).backward()
            else:
                F.cross_entropy(scores, target, ignore_index=-100, reduction="sum").backward()
            return
        live = (target != -100).unsqueeze(-1) if not self.regression else None
        probs = None if self.regression else scores.softmax(-1)
        for k in range(mc_samples):
            on_sample(k, 1.0 / mc_samples)
            if self.regression:      # y ~ N(f, 1): d/df 1/2 (f - y)^2 = f - y = -noise
                grad = -torch.randn(scores.shape, generator=generator, device=scores.device, dtype=scores.dtype)
            else:
                y = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
                grad = (probs - F.one_hot(y, probs.shape[-1]).to(probs.dtype)) * live
            scores.backward(grad, retain_graph=k < mc_samples - 1)

    def _scores(self, output, p: Prepared, fisher: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (N, C) in fp32 (fp64 for a fp64 model) and targets (N,), -100 where none."""
        logits = output.logits
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        labels = p.labels
        if labels is None and fisher == "empirical":
            raise ValueError("fisher='empirical' needs labels: give batches with 'labels' (-100 where no loss) or "
                             "(input_ids, labels) tuples, or use fisher='mc'")
        if self.family == "causal_lm":
            valid = p.streams["encoder"].view(logits.shape[0], -1)
            ids = p.kwargs["input_ids"]
            target = labels[:, 1:] if labels is not None else torch.where(valid[:, 1:], ids[:, 1:], -100)
            return logits[:, :-1].flatten(0, 1), target.flatten()
        if self.family == "seq2seq_lm":
            if labels is None:
                target = torch.where(p.streams["decoder"].view(logits.shape[:2]), 0, -100)
            else:
                target = labels
            return logits.flatten(0, 1), target.flatten()
        if self.family == "token_classification":
            valid = p.streams["encoder"].view(logits.shape[:2])
            target = labels if labels is not None else torch.where(valid, 0, -100)
            return logits.flatten(0, 1), target.flatten()
        target = labels if labels is not None else torch.zeros(logits.shape[0], dtype=torch.long,
                                                               device=logits.device)
        return logits, target.reshape(-1) if not self.regression else target.reshape(logits.shape[0], -1).squeeze(-1)
