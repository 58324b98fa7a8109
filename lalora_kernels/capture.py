"""Proxy passes over peft models: ``estimate_curvature`` (SPEC sections 2, 3 and 5).

Each LoRA layer gets a forward hook that keeps its input ``x`` and hangs a gradient hook on its
output ``h``; the factors are accumulated inside the gradient hook, once per backward pass. That
makes the count exact under gradient checkpointing (a recomputed forward registers the hook that
fires; a no-grad forward registers none) and with several MC backward passes per forward.
Inputs shared by several layers (q/k/v, gate/up) are detected by tensor identity on the first
batch; one ``Sx`` per shared input is accumulated, by the first layer that reads it.
"""
from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Mapping
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import ops as lalora_ops
from .curvature import FISHERS, AdapterInfo, LoRACurvature, check_layout, check_variant
from .distributed import agree, all_reduce_sums, fingerprint, rank_generator
from .lora_layers import LoRALayerRef, find_lora_layers
from .gram_meta import GramMeta
from .reference.packed_format import TILE, check_tile, packed_numel

ops = torch.ops.lalora


class DegenerateCurvatureWarning(UserWarning):
    """The anchors make part of the curvature exactly zero (SPEC section 5)."""


def _unpack(batch, device, vocab: Optional[int] = None) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    if isinstance(batch, Mapping):          # dict, or transformers' BatchEncoding
        if "input_ids" not in batch:
            raise ValueError(f"a batch dict must hold 'input_ids' (got keys {sorted(batch)})")
        ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch.get("labels")
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        (ids, labels), mask = batch, None
    else:
        raise ValueError("each batch must be a dict with 'input_ids', 'attention_mask', 'labels' or a "
                         f"tuple (input_ids, labels); got {type(batch).__name__}")
    ids = ids.to(device)
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError(f"input_ids has shape {tuple(ids.shape)}: a batch needs at least one sequence of at least "
                         "one token")
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must hold integer token ids, got {ids.dtype}")
    if vocab is not None and (int(ids.max()) >= vocab or int(ids.min()) < 0):
        raise ValueError(f"input_ids holds token ids from {int(ids.min())} to {int(ids.max())} but the model's "
                         f"embedding has {vocab} rows: tokenize with the model's own tokenizer")
    for name, t in (("attention_mask", mask), ("labels", labels)):
        if t is not None and tuple(t.shape) != tuple(ids.shape):
            raise ValueError(f"{name} has shape {tuple(t.shape)} but input_ids has {tuple(ids.shape)}; they must match")
    return ids, None if mask is None else mask.to(device), None if labels is None else labels.to(device)


class _Plan:
    """What each adapter needs under a variant, given its anchors (SPEC section 5)."""

    def __init__(self, variant: str, refs: list[LoRALayerRef], groups: dict[str, str], dtype):
        self.variant, self.dtype = variant, dtype
        self.A0 = {r.name: r.A.detach().clone() for r in refs}
        self.B0 = {r.name: r.B.detach().clone() for r in refs}
        a_live = {r.name: bool(self.A0[r.name].any()) for r in refs}
        b_live = {r.name: bool(self.B0[r.name].any()) for r in refs}
        kron = variant in ("kfac", "tri")
        self.need_sx = {n: variant == "wkfac" or (kron and b_live[n]) for n in a_live}
        self.need_sg = {n: variant == "wkfac" or (kron and a_live[n]) for n in a_live}
        self.need_fa = {n: variant == "diag" and b_live[n] for n in a_live}
        self.need_fb = {n: variant == "diag" and a_live[n] for n in a_live}
        self.groups = groups
        self.leaders = {g for g in groups.values()}
        self.group_needs_sx = {g: any(self.need_sx[n] for n, l in groups.items() if l == g)
                               for g in self.leaders}
        self.degenerate = [n for n in a_live if variant != "wkfac" and not b_live[n]]


class _Capture:
    """Hooks, accumulators and the model state they must leave untouched."""

    def __init__(self, model: nn.Module, refs: list[LoRALayerRef], variant: str, storage: str, tile: int):
        self.model, self.refs, self.variant = model, refs, variant
        self.tile = tile if storage == "packed" else 0
        p = refs[0].A
        self.dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        self.device = p.device
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        self.vocab = getattr(emb, "num_embeddings", None)
        self.sums: dict[str, torch.Tensor] = {}
        self.plan: Optional[_Plan] = None
        self.seen: list[tuple[str, torch.Tensor]] = []   # first forward: (name, x) for dedup
        self.valid: Optional[torch.Tensor] = None
        self.sample, self.sample_weight = 0, 1.0
        self.handles = []

    # -- model state ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def attached(self):
        model = self.model
        modes = {m: m.training for m in model.modules()}
        grads = {p: p.grad for p in model.parameters()}
        lora_params = [t for r in self.refs for t in (r.A, r.B)]
        req = [t.requires_grad for t in lora_params]
        try:
            model.eval()
            for m in model.modules():   # keep HF gradient checkpointing active, dropout off
                if getattr(m, "gradient_checkpointing", False) is True:
                    m.training = True
            for p in model.parameters():
                p.grad = None
            for t in lora_params:
                t.requires_grad_(True)
            for r in self.refs:
                self.handles.append(r.module.register_forward_hook(self._forward_hook(r)))
            yield self
        finally:
            for h in self.handles:
                h.remove()
            self.handles.clear()
            for t, flag in zip(lora_params, req):
                t.requires_grad_(flag)
            for p, g in grads.items():
                p.grad = g
            for m, flag in modes.items():
                m.training = flag

    # -- hooks ----------------------------------------------------------------------------------
    def _forward_hook(self, ref: LoRALayerRef):
        def hook(module, args, output):
            x = args[0]
            if self.plan is None:
                self.seen.append((ref.name, x))
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(lambda g: self._accumulate(ref, x, g))
        return hook

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1, t.shape[-1])
        if t.shape[0] != self.valid.numel():
            raise RuntimeError(f"a LoRA layer saw {t.shape[0]} tokens but the batch has "
                               f"{self.valid.numel()}; sequence packing inside the model is not supported")
        return t[self.valid]

    def _acc(self, key: str, shape) -> torch.Tensor:
        if key not in self.sums:
            self.sums[key] = torch.zeros(shape, dtype=self.dtype, device=self.device)
        return self.sums[key]

    def _cov(self, key: str, n: int, rows: torch.Tensor, weight: float) -> None:
        """Sx/Sg += weight * rows^T rows, dense or tile-packed."""
        if self.tile:
            ops.packed_cov_update_(self._acc(key, (packed_numel(n, self.tile),)), rows, None, weight, self.tile)
        else:
            ops.cov_update_(self._acc(key, (n, n)), rows, None, weight)

    def _accumulate(self, ref: LoRALayerRef, x: torch.Tensor, g: torch.Tensor) -> None:
        plan, n = self.plan, ref.name
        w, first = self.sample_weight, self.sample == 0
        # rows stay in the model's dtype for the big covariances (bf16 in, fp32 accumulate); the
        # r-column projections are formed in the accumulator's dtype
        X, G = self._rows(x.detach()), self._rows(g)
        A0, B0 = plan.A0[n].to(self.dtype), plan.B0[n].to(self.dtype)
        i, o, r, s = ref.shape
        if n in plan.leaders and plan.group_needs_sx[n] and first:
            self._cov(f"Sx/{n}", i, X, 1.0)
        if plan.need_sg[n]:
            self._cov(f"Sg/{n}", o, G, w)
        if self.variant in ("kfac", "tri"):
            if plan.need_sg[n] and first:       # Caa = cov(A* x): the B block's input factor
                ops.cov_update_(self._acc(f"Caa/{n}", (r, r)), X.to(self.dtype) @ A0.T, None, 1.0)
            if plan.need_sx[n]:                 # Cbb = cov(B*^T g): the A block's gradient factor
                ops.cov_update_(self._acc(f"Cbb/{n}", (r, r)), G.to(self.dtype) @ B0, None, w)
        if plan.need_fa[n]:
            ops.sqcov_update_(self._acc(f"FA/{n}", (r, i)), G.to(self.dtype) @ B0, X, None, w * s * s)
        if plan.need_fb[n]:
            ops.sqcov_update_(self._acc(f"FB/{n}", (o, r)), G, X.to(self.dtype) @ A0.T, None, w * s * s)

    def _groups_from_first_forward(self) -> dict[str, str]:
        groups: dict[str, str] = {}
        leaders: list[tuple[str, torch.Tensor]] = []
        for name, x in self.seen:
            if name in groups:
                continue
            leader = next((ln for ln, lx in leaders if lx is x), None)
            if leader is None:
                leaders.append((name, x))
                leader = name
            groups[name] = leader
        missing = [r.name for r in self.refs if r.name not in groups]
        if missing:
            raise RuntimeError(f"LoRA layers {missing[:3]} were not called in the forward pass; "
                               "the curvature would be incomplete")
        self.seen.clear()
        return groups

    # -- one batch ------------------------------------------------------------------------------
    def run_batch(self, batch, fisher: str, mc_samples: int, generator) -> int:
        ids, mask, labels = _unpack(batch, self.device, self.vocab)
        if labels is None and fisher == "empirical":
            raise ValueError("fisher='empirical' needs labels: give batches with 'labels' (-100 where no "
                             "loss) or (input_ids, labels) tuples, or use fisher='mc'")
        valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        self.valid = valid.reshape(-1)
        kwargs = {"input_ids": ids} if mask is None else {"input_ids": ids, "attention_mask": mask}
        logits = self.model(**kwargs, use_cache=False).logits[:, :-1].float()
        if self.plan is None:
            self.plan = _Plan(self.variant, self.refs, self._groups_from_first_forward(), self.dtype)
        if labels is not None:
            target = labels[:, 1:]
        else:                                   # mc without labels: every valid next token
            target = torch.where(valid[:, 1:], ids[:, 1:], torch.full_like(ids[:, 1:], -100))
        if fisher == "empirical":
            self.sample, self.sample_weight = 0, 1.0
            F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100,
                            reduction="sum").backward()
        else:
            probs = logits.softmax(-1)
            live = (target != -100).unsqueeze(-1)
            for k in range(mc_samples):
                self.sample, self.sample_weight = k, 1.0 / mc_samples
                y = torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(target.shape)
                dlogits = (probs - F.one_hot(y, probs.shape[-1]).to(probs.dtype)) * live
                logits.backward(dlogits, retain_graph=k < mc_samples - 1)
        for r in self.refs:
            r.A.grad, r.B.grad = None, None
        return int(valid.sum())

    def packed_dims(self) -> dict[str, int]:
        """n of every tile-packed accumulator."""
        if not self.tile:
            return {}
        dims = {r.name: r.shape for r in self.refs}
        return {k: dims[k.split("/", 1)[1]][0 if k.startswith("Sx/") else 1]
                for k in self.sums if k.startswith(("Sx/", "Sg/"))}

    # -- result ---------------------------------------------------------------------------------
    def result(self, fisher: str, mc_samples: int, num_tokens: int) -> LoRACurvature:
        plan = self.plan
        tensors: dict[str, torch.Tensor] = {}
        for key, t in self.sums.items():
            tensors[key] = t.div_(num_tokens)
        adapters = {}
        for r in self.refs:
            n = r.name
            i, o, rank, s = r.shape
            adapters[n] = AdapterInfo(i, o, rank, s, plan.groups[n], plan.need_sx[n], plan.need_sg[n])
            tensors[f"A0/{n}"], tensors[f"B0/{n}"] = plan.A0[n], plan.B0[n]
            if self.variant == "tri" and plan.need_sx[n] and plan.need_sg[n]:
                # Ka = A* Sx, Kb = Sg B* (SPEC section 3), read straight from the stored layout
                Sx, Sg = tensors[f"Sx/{plan.groups[n]}"], tensors[f"Sg/{n}"]
                tensors[f"Ka/{n}"] = _sym_product(plan.A0[n].to(self.dtype), Sx, i, self.tile)
                tensors[f"Kb/{n}"] = _sym_product(plan.B0[n].to(self.dtype).T, Sg, o, self.tile).T
        model_type = getattr(getattr(self.model, "config", None), "model_type", type(self.model).__name__)
        return LoRACurvature(variant=self.variant, fisher=fisher, mc_samples=mc_samples,
                             num_tokens=num_tokens, adapter_name=self.refs[0].adapter,
                             model_type=str(model_type), adapters=adapters, tensors=tensors,
                             layout="packed" if self.tile else "dense", tile=self.tile or TILE)


def _sym_product(D: torch.Tensor, S: torch.Tensor, n: int, tile: int) -> torch.Tensor:
    """``D S`` for one symmetric factor S, dense (n, n) or tile-packed (tile > 0), through
    ``lalora::grouped_gram`` (so on the active backend). D: (R, n)."""
    meta = GramMeta.build([(n, D.shape[0], 1)], tile)
    return ops.grouped_gram(D.reshape(-1), S.reshape(-1), meta.classes, tile)[1].view(D.shape[0], n)


def _warn_degenerate(variant: str, names: list[str], total: int) -> None:
    warnings.warn(
        f"{len(names)} of {total} adapters have B* = 0 (standard LoRA init), so under variant="
        f"{variant!r} their A block{' and A-B cross block' if variant == 'tri' else ''} is exactly zero: "
        "the penalty constrains B only and Sx is not stored for them (SPEC section 5). Remedies: "
        "variant='wkfac' (penalises the true weight change), a non-zero-B init (peft "
        "init_lora_weights='pissa', 'olora', 'corda' or 'eva'), or estimate after a short warm-up.",
        DegenerateCurvatureWarning, stacklevel=3)


def estimate_curvature(model: nn.Module, batches: Iterable, variant: str = "kfac",
                       fisher: str = "empirical", mc_samples: int = 1,
                       max_batches: Optional[int] = None, progress: bool = True,
                       generator: Optional[torch.Generator] = None, storage: Optional[str] = None,
                       tile: int = TILE) -> LoRACurvature:
    """Laplace curvature of the active LoRA adapter of a peft model from proxy (source) batches.

    model: a peft model with LoRA on ``nn.Linear`` layers. batches: iterable of HF-style dicts
    (``input_ids``, optional ``attention_mask``, ``labels`` with -100 where no loss) or
    ``(input_ids, labels)`` tuples. variant: 'diag' | 'kfac' | 'tri' | 'wkfac'. fisher:
    'empirical' (data labels) or 'mc' (labels drawn from the model, ``mc_samples`` draws per
    position, ``generator`` seeds them). The anchors are the LoRA weights at call time. The model's
    train/eval mode, gradients and requires_grad flags are restored afterwards, also on error.
    Under torch.distributed, each rank passes its own shard of the data: the factor sums and token
    counts are added across ranks once at the end (every rank gets the same curvature), and MC
    labels are drawn from a per-rank generator.
    storage: 'packed' (Sx/Sg as upper T x T tiles, ``tile`` = T, about half the memory) or 'dense';
    None picks 'packed' where packed kernels run natively (C++ on CPU, Triton on CUDA), see
    ``lalora_kernels.backends()``.
    """
    check_variant(variant)
    if fisher not in FISHERS:
        raise ValueError(f"fisher={fisher!r} is unknown; use 'empirical' or 'mc'")
    if not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples={mc_samples!r} must be a positive int")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches={max_batches!r} must be None or >= 1")
    check_tile(tile)
    if torch.is_inference_mode_enabled():
        raise RuntimeError("estimate_curvature needs autograd (it backpropagates through the model): call it "
                           "outside torch.inference_mode()")
    refs = find_lora_layers(model)
    off = [r.name for r in refs if getattr(r.module, "disable_adapters", False)]
    if off:
        raise ValueError(f"the LoRA adapters of {off[:3]} are disabled (inside peft's disable_adapter()?), so "
                         "the proxy passes would not reach them; estimate with the adapters enabled")
    storage = lalora_ops.default_storage(refs[0].A.device) if storage is None else storage
    check_layout(storage)
    cap = _Capture(model, refs, variant, storage, tile)
    num_tokens = nb = 0
    it = batches if max_batches is None else itertools.islice(batches, max_batches)
    generator = rank_generator(generator, cap.device) if fisher == "mc" else generator
    error = None
    try:
        with cap.attached(), torch.enable_grad():        # also when called under torch.no_grad()
            for batch in tqdm(it, desc=f"lalora curvature ({variant})", disable=not progress,
                              total=max_batches, unit="batch"):
                num_tokens += cap.run_batch(batch, fisher, mc_samples, generator)
                nb += 1
        if nb == 0:
            raise ValueError("batches is empty: pass at least one batch of source (proxy) data")
    except Exception as exc:                     # every rank must hear of it before any reduction
        error = exc
    agree(error, None if error else fingerprint(
        cap.sums, [t for r in cap.refs for t in (cap.plan.A0[r.name], cap.plan.B0[r.name])], variant=variant,
        fisher=fisher, mc_samples=mc_samples, storage=storage, tile=cap.tile, dtype=str(cap.dtype)))
    num_tokens = all_reduce_sums(cap.sums, num_tokens, cap.packed_dims(), cap.tile)   # no-op outside torch.distributed
    if num_tokens == 0:
        raise ValueError("every token of every batch is masked out (attention_mask all 0)")
    if cap.plan.degenerate:
        _warn_degenerate(variant, cap.plan.degenerate, len(refs))
    return cap.result(fisher, mc_samples, num_tokens)
