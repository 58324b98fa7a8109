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
from typing import Callable, Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from . import ops as lalora_ops
from .curvature import FISHERS, AdapterInfo, LoRACurvature, check_layout, check_variant
from .distributed import agree, all_reduce_sums, fingerprint, rank_generator, same_batch_count
from .capture_lowrank import LowRank, accumulator_bytes, chunks, omega
from .gram_meta import GramMeta
from .reference import lowrank_format
from .lora_layers import (LoRALayerRef, find_lora_layers, full, is_partitioned, is_zero3_partitioned, unwrap,
                          warn_uncovered)
from .proxy_loss import Prepared, ProxyLoss
from .reference.packed_format import TILE, check_tile, packed_numel

ops = torch.ops.lalora


ZERO3_OUTSIDE_ENGINE = (
    "the model's LoRA weights are partitioned by DeepSpeed ZeRO-3 (built under deepspeed.zero.Init, e.g. "
    "from_pretrained with a ZeRO-3 config active) but the model is not inside a DeepSpeed engine, so its forward "
    "cannot gather them: pass the engine from deepspeed.initialize (estimate_curvature(engine, ...)), or build "
    "the model without zero.Init")


class DegenerateCurvatureWarning(UserWarning):
    """The anchors make part of the curvature exactly zero (SPEC section 5)."""


class _Plan:
    """What each adapter needs under a variant, given its anchors (SPEC section 5)."""

    def __init__(self, variant: str, refs: list[LoRALayerRef], groups: dict[str, str], dtype):
        self.variant, self.dtype = variant, dtype
        self.A0 = {r.name: full(r.A).detach().clone() for r in refs}      # FSDP2, ZeRO-3: gathered
        self.B0 = {r.name: full(r.B).detach().clone() for r in refs}
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

    def __init__(self, model: nn.Module, refs: list[LoRALayerRef], variant: str, storage: str, tile: int,
                 loss: ProxyLoss, sketch: Optional[LowRank] = None):
        self.model, self.refs, self.variant, self.loss, self.sketch = model, refs, variant, loss, sketch
        self.tile = tile if storage == "packed" else 0
        self.omegas: dict[str, tuple] = {}               # sketch: each factor's test-matrix shape
        self.traces: dict[str, torch.Tensor] = {}        # sketch: each factor's exact trace
        self.peak_bytes = 0                              # the accumulators' high-water mark
        p = refs[0].A
        self.dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        self.device = p.device
        self.sums: dict[str, torch.Tensor] = {}
        self.stream_of_key: dict[str, str] = {}          # which tokens each sum is a mean over
        self.tokens: dict[str, int] = {}                 # valid tokens seen, per stream
        self.plan: Optional[_Plan] = None
        self.seen: list[tuple[str, torch.Tensor]] = []   # first forward: (name, x) for dedup
        self.batch: Optional[Prepared] = None
        self.sample, self.sample_weight = 0, 1.0
        self.handles = []

    # -- model state ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def attached(self):
        model = self.model
        modes = {m: m.training for m in model.modules()}
        grads = {p: p.grad for p in model.parameters()}
        lora_params = [t for r in self.refs for t in (r.A, r.B)]
        zero3 = is_zero3_partitioned(lora_params[0])
        req = {p: p.requires_grad for p in (model.parameters() if zero3 else lora_params)}
        try:
            model.eval()
            for m in model.modules():   # keep HF gradient checkpointing active, dropout off
                if getattr(m, "gradient_checkpointing", False) is True:
                    m.training = True
            for p in model.parameters():
                p.grad = None
            if zero3:
                # DeepSpeed reduces every gradient that reaches a ZeRO-3 parameter into the optimizer's
                # partitions, where the next step would take it: the proxy backward reaches none. The
                # LoRA layers' outputs get their gradient through the input embeddings' output instead.
                for p in model.parameters():
                    p.requires_grad_(False)
                emb = unwrap(model).get_input_embeddings()
                self.handles.append(emb.register_forward_hook(lambda m, args, out: out.requires_grad_()))
            for t in lora_params:
                t.requires_grad_(not zero3)
            for r in self.refs:
                self.handles.append(r.module.register_forward_hook(self._forward_hook(r)))
            yield self
        finally:
            for h in self.handles:
                h.remove()
            self.handles.clear()
            for t, flag in req.items():
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

    def _rows(self, ref: LoRALayerRef, t: torch.Tensor) -> tuple[torch.Tensor, str]:
        """The layer's valid token rows and the stream they belong to."""
        t = t.reshape(-1, t.shape[-1])
        stream = self.loss.stream_of(ref.name, t.shape[0], self.batch.streams)
        return t[self.batch.streams[stream]], stream

    def _acc(self, key: str, shape, stream: str) -> torch.Tensor:
        if key not in self.sums:
            self.sums[key] = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.stream_of_key[key] = stream
            big = [t for k, t in self.sums.items() if k.startswith(("Sx/", "Sg/", "sketch:"))]
            self.peak_bytes = max(self.peak_bytes, sum(t.numel() * t.element_size() for t in big))
        elif self.stream_of_key[key] != stream:
            raise RuntimeError(f"{key} summed tokens of the {self.stream_of_key[key]} and then of the {stream}; "
                               "a LoRA layer must see the same stream in every batch")
        return self.sums[key]

    def _cov(self, key: str, n: int, rows: torch.Tensor, weight: float, stream: str) -> None:
        """Sx/Sg += weight * rows^T rows, dense or tile-packed; a sketch adds weight * rows^T (rows Omega)
        and the exact trace instead."""
        if self.sketch is not None:           # Omega is drawn again at each use (never held): same seed
            om = omega(key, n, self.sketch.sketch_width(n), self.sketch.seed, self.dtype, self.device)
            self.omegas[key] = om.shape
            rows = rows.to(self.dtype)
            self._acc(f"sketch:{key}", (n, om.shape[1]), stream).addmm_(rows.T, rows @ om, alpha=weight)
            tr = self._acc(f"trace:{key}", (), stream)
            tr.add_(rows.square().sum(), alpha=weight)
            return
        if self.tile:
            ops.packed_cov_update_(self._acc(key, (packed_numel(n, self.tile),), stream), rows, None, weight,
                                   self.tile)
        else:
            ops.cov_update_(self._acc(key, (n, n), stream), rows, None, weight)

    def _accumulate(self, ref: LoRALayerRef, x: torch.Tensor, g: torch.Tensor) -> None:
        plan, n = self.plan, ref.name
        w, first = self.sample_weight, self.sample == 0
        # rows stay in the model's dtype for the big covariances (bf16 in, fp32 accumulate); the
        # r-column projections are formed in the accumulator's dtype
        (X, stream), (G, _) = self._rows(ref, x.detach()), self._rows(ref, g)
        A0, B0 = plan.A0[n].to(self.dtype), plan.B0[n].to(self.dtype)
        i, o, r, s = ref.shape
        if n in plan.leaders and plan.group_needs_sx[n] and first:
            self._cov(f"Sx/{n}", i, X, 1.0, stream)
        if plan.need_sg[n]:
            self._cov(f"Sg/{n}", o, G, w, stream)
        if self.variant in ("kfac", "tri"):
            if plan.need_sg[n] and first:       # Caa = cov(A* x): the B block's input factor
                ops.cov_update_(self._acc(f"Caa/{n}", (r, r), stream), X.to(self.dtype) @ A0.T, None, 1.0)
            if plan.need_sx[n]:                 # Cbb = cov(B*^T g): the A block's gradient factor
                ops.cov_update_(self._acc(f"Cbb/{n}", (r, r), stream), G.to(self.dtype) @ B0, None, w)
        if plan.need_fa[n]:
            ops.sqcov_update_(self._acc(f"FA/{n}", (r, i), stream), G.to(self.dtype) @ B0, X, None, w * s * s)
        if plan.need_fb[n]:
            ops.sqcov_update_(self._acc(f"FB/{n}", (o, r), stream), G, X.to(self.dtype) @ A0.T, None, w * s * s)

    def probe_groups(self, batch) -> dict[str, str]:
        """Which layers share an input (leader per layer), from one forward of ``batch``, no backward."""
        with self.attached(), torch.no_grad():
            self.model(**self.loss.prepare(batch, self.device).kwargs)
        return self._groups_from_first_forward()

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
    def run_batch(self, batch, fisher: str, mc_samples: int, generator) -> None:
        self.batch = p = self.loss.prepare(batch, self.device)
        output = self.model(**p.kwargs)
        if self.plan is None:
            self.plan = _Plan(self.variant, self.refs, self._groups_from_first_forward(), self.dtype)

        def on_sample(k: int, weight: float) -> None:
            self.sample, self.sample_weight = k, weight
        self.loss.backward(output, p, fisher, mc_samples, generator, on_sample)
        for r in self.refs:
            r.A.grad, r.B.grad = None, None
        for stream, mask in p.streams.items():
            self.tokens[stream] = self.tokens.get(stream, 0) + int(mask.sum())

    def packed_dims(self) -> dict[str, int]:
        """n of every tile-packed accumulator."""
        if not self.tile or self.sketch is not None:
            return {}
        dims = {r.name: r.shape for r in self.refs}
        return {k: dims[k.split("/", 1)[1]][0 if k.startswith("Sx/") else 1]
                for k in self.sums if k.startswith(("Sx/", "Sg/"))}

    # -- result ---------------------------------------------------------------------------------
    def result(self, fisher: str, mc_samples: int) -> LoRACurvature:
        plan = self.plan
        tensors: dict[str, torch.Tensor] = {}
        for key, t in self.sums.items():
            tokens = self.tokens[self.stream_of_key[key]]
            if tokens == 0:
                raise ValueError(f"every {self.stream_of_key[key]} token of every batch is masked out "
                                 "(attention masks all 0)")
            tensors[key] = t.div_(tokens)
        if self.sketch is not None:            # each factor from its sketch and exact trace (Nystrom)
            lr = self.sketch
            for key in list(self.omegas):
                kind, name = key.split("/", 1)
                n, width = self.omegas[key]
                tensors[key], tensors[f"{kind}E/{name}"] = lowrank_format.nystrom(
                    tensors.pop(f"sketch:{key}"), omega(key, n, width, lr.seed, self.dtype, self.device),
                    float(tensors.pop(f"trace:{key}")), lr.rank, lr.energy)
        adapters = {}
        for r in self.refs:
            n = r.name
            i, o, rank, s = r.shape
            adapters[n] = AdapterInfo(i, o, rank, s, plan.groups[n], plan.need_sx[n], plan.need_sg[n])
            tensors[f"A0/{n}"], tensors[f"B0/{n}"] = plan.A0[n], plan.B0[n]
            if self.variant == "tri" and plan.need_sx[n] and plan.need_sg[n]:
                # Ka = A* Sx, Kb = Sg B* (SPEC section 3), read straight from the stored layout
                sx, sg = f"Sx/{plan.groups[n]}", f"Sg/{n}"
                if self.sketch is not None:       # of the compressed factors: no exact one was formed
                    tensors[f"Ka/{n}"] = _lowrank_product(plan.A0[n].to(self.dtype), tensors[sx], tensors[f"SxE/{sx[3:]}"])
                    tensors[f"Kb/{n}"] = _lowrank_product(plan.B0[n].to(self.dtype).T, tensors[sg],
                                                          tensors[f"SgE/{n}"]).T
                else:
                    tensors[f"Ka/{n}"] = _sym_product(plan.A0[n].to(self.dtype), tensors[sx], i, self.tile)
                    tensors[f"Kb/{n}"] = _sym_product(plan.B0[n].to(self.dtype).T, tensors[sg], o, self.tile).T
        model_type = getattr(getattr(self.model, "config", None), "model_type", type(self.model).__name__)
        return LoRACurvature(variant=self.variant, fisher=fisher, mc_samples=mc_samples,
                             num_tokens=self.tokens["encoder"], adapter_name=self.refs[0].adapter,
                             model_type=str(model_type), adapters=adapters, tensors=tensors,
                             layout="lowrank" if self.sketch is not None else "packed" if self.tile else "dense",
                             tile=self.tile or TILE)


def _sym_product(D: torch.Tensor, S: torch.Tensor, n: int, tile: int) -> torch.Tensor:
    """``D S`` for one symmetric factor S, dense (n, n) or tile-packed (tile > 0), through
    ``lalora::grouped_gram`` (so on the active backend). D: (R, n)."""
    meta = GramMeta.build([(n, D.shape[0], 1)], tile)
    return ops.grouped_gram(D.reshape(-1), S.reshape(-1), meta.classes, tile)[1].view(D.shape[0], n)


def _lowrank_product(D: torch.Tensor, U: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
    """``D S_c`` for one low-rank factor (``reference.lowrank_format``). D: (R, n)."""
    R, n = D.shape
    meta = GramMeta.build([(n, R, 1)], 0, sizes=[U.numel()])
    return ops.grouped_gram_lowrank(D.reshape(-1), U.reshape(-1), E, meta.classes, [U.shape[1], 0])[1].view(R, n)


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
                       generator: Optional[torch.Generator] = None, storage=None,
                       tile: int = TILE, loss_fn: Optional[Callable] = None) -> LoRACurvature:
    """Laplace curvature of the active LoRA adapter of a peft model from proxy (source) batches.

    model: a peft model with LoRA on linear layers (``nn.Linear``, or GPT-2's ``Conv1D``): a causal
    LM, a seq2seq LM, or a sequence or token classifier (``proxy_loss``). batches: iterable of dicts
    of model inputs (``input_ids``, ``attention_mask``, ``labels`` with -100 where no loss, and
    whatever else the model's forward takes, e.g. ``position_ids`` of packed batches) or
    ``(input_ids, labels)`` tuples. variant: 'diag' | 'kfac' | 'tri' | 'wkfac'. fisher:
    'empirical' (data labels) or 'mc' (labels drawn from the model, ``mc_samples`` draws per
    position, ``generator`` seeds them). loss_fn(output, batch): the summed loss to differentiate
    instead of the family's own (empirical only). The anchors are the LoRA weights at call time.
    The model's train/eval mode, gradients and requires_grad flags are restored afterwards, also on
    error. Under torch.distributed, each rank passes its own shard of the data: the ranks first
    agree that they hold the same model and arguments, then the factor sums and token counts are
    added once at the end (every rank gets the same curvature); MC labels come from per-rank
    generators.
    storage: 'packed' (Sx/Sg as upper T x T tiles, ``tile`` = T, about half the memory), 'dense', or
    ``LowRank(rank=..., energy=..., capture=..., budget=...)`` (each Sx/Sg as its top eigenpairs plus a
    trace-keeping tail, captured without holding every factor at once: ``capture_lowrank``); None
    picks 'packed' where packed kernels run natively (C++ on CPU, Triton on CUDA), see
    ``lalora_kernels.backends()``. The returned curvature's ``capture_stats`` says how many proxy
    passes ran and the factor accumulators' peak bytes.
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
    lowrank = storage if isinstance(storage, LowRank) else None
    inner = lalora_ops.default_storage(refs[0].A.device) if storage is None or lowrank else storage
    check_layout(inner)
    loss = ProxyLoss(model, loss_fn)
    it = batches if max_batches is None else list(itertools.islice(batches, max_batches))
    generator = rank_generator(generator, refs[0].A.device) if fisher == "mc" else generator
    if is_zero3_partitioned(refs[0].A) and not hasattr(refs[0].module, "ds_id"):
        raise ValueError(ZERO3_OUTSIDE_ENGINE)
    if any(is_partitioned(r.A) for r in refs):     # FSDP2, ZeRO-3: every forward and backward is a collective
        it = list(it)
        same_batch_count(len(it))
    args = dict(variant=variant, fisher=fisher, mc_samples=mc_samples, progress=progress, tile=tile)
    if lowrank is None or lowrank.capture == "sketch":
        if lowrank is not None and lowrank.budget is not None:
            need = sum(nbytes for _, nbytes in _units(model, refs, it, inner, loss, lowrank, **args))
            if need > lowrank.budget:
                raise ValueError(f"capture='sketch' at rank {lowrank.rank} holds {need} bytes of sketches at once, "
                                 f"more than budget={lowrank.budget}: lower the rank, raise the budget, or use "
                                 "capture='exact' (one pass per chunk of layers)")
        curv, cap = _estimate(model, refs, it, inner, loss, generator, sketch=lowrank, **args)
        stats = {"passes": 1, "peak_factor_bytes": cap.peak_bytes}
    else:
        curv, stats = _estimate_chunked(model, refs, it, inner, loss, generator, lowrank, **args)
    zero_b = [n for n in curv.adapters if variant != "wkfac" and not bool(curv.get("B0", n).any())]
    if zero_b:
        _warn_degenerate(variant, zero_b, len(refs))
    warn_uncovered(model, refs)
    curv.capture_stats = stats
    return curv


def _estimate(model, refs, batches, storage, loss, generator, *, variant, fisher, mc_samples, progress, tile,
              sketch=None) -> tuple[LoRACurvature, _Capture]:
    """One proxy pass over ``batches`` accumulating the factors of ``refs``; every rank agrees, then
    the sums are reduced."""
    cap = _Capture(model, refs, variant, storage, tile, loss, sketch)
    nb, error = 0, None
    try:
        with cap.attached(), torch.enable_grad():        # also when called under torch.no_grad()
            for batch in tqdm(batches, desc=f"lalora curvature ({variant})", disable=not progress, unit="batch"):
                cap.run_batch(batch, fisher, mc_samples, generator)
                nb += 1
        if nb == 0:
            raise ValueError("batches is empty: pass at least one batch of source (proxy) data")
    except Exception as exc:                     # every rank must hear of it before any reduction
        error = exc
    agree(error, None if error else fingerprint(
        cap.sums, [t for r in cap.refs for t in (cap.plan.A0[r.name], cap.plan.B0[r.name])], variant=variant,
        fisher=fisher, mc_samples=mc_samples, storage=storage, tile=cap.tile, dtype=str(cap.dtype),
        streams=sorted(cap.tokens), sketch=str(sketch)))
    cap.tokens = all_reduce_sums(cap.sums, cap.tokens, cap.packed_dims(), cap.tile)   # no-op outside distributed
    return cap.result(fisher, mc_samples), cap


def _units(model, refs, batches, storage, loss, sketch: Optional[LowRank], **args) -> list[tuple[list[str], int]]:
    """The layer groups (layers sharing an input, found by one forward of the first batch) and the
    bytes of their big-factor accumulators: exact factors (``sketch`` None) or sketches."""
    if iter(batches) is batches:
        raise ValueError("a low-rank capture with a budget looks at the first batch before the pass: pass a list or "
                         "a DataLoader, not an iterator")
    probe = _Capture(model, refs, args["variant"], storage, args["tile"], loss)
    groups = probe.probe_groups(next(iter(batches)))
    itemsize = 8 if probe.dtype == torch.float64 else 4
    shape = {r.name: r.shape for r in refs}
    units = []
    for leader in dict.fromkeys(groups.values()):
        names = [r.name for r in refs if groups[r.name] == leader]
        nbytes = accumulator_bytes(shape[leader][0], probe.tile, itemsize, sketch) + sum(
            accumulator_bytes(shape[n][1], probe.tile, itemsize, sketch) for n in names)
        units.append((names, nbytes))
    return units


def _estimate_chunked(model, refs, batches, storage, loss, generator, lowrank: LowRank, **args
                      ) -> tuple[LoRACurvature, dict]:
    """The exact low-rank capture: layer groups (those sharing an input together) in chunks whose
    accumulators fit ``lowrank.budget``, a proxy pass per chunk (each with the same MC draws), each
    chunk's factors eigendecomposed and cut before the next chunk starts."""
    if iter(batches) is batches:
        raise ValueError("capture='exact' reads the batches once per chunk of layers: pass a list or a DataLoader, "
                         "not an iterator (or use LowRank(capture='sketch'), one pass)")
    units = _units(model, refs, batches, storage, loss, None, **args)
    state = generator.get_state() if generator is not None else None
    parts, peak = [], 0
    for names in chunks(units, lowrank.budget):
        if state is not None:
            generator.set_state(state)
        part, cap = _estimate(model, [r for r in refs if r.name in set(names)], batches, storage, loss, generator,
                              **args)
        peak = max(peak, cap.peak_bytes)
        parts.append(part.to_layout("lowrank", rank=lowrank.rank, energy=lowrank.energy))
    first = parts[0]
    curv = LoRACurvature(variant=first.variant, fisher=first.fisher, mc_samples=first.mc_samples,
                         num_tokens=first.num_tokens, adapter_name=first.adapter_name, model_type=first.model_type,
                         adapters={r.name: a for r in refs for p in parts for n, a in p.adapters.items() if n == r.name},
                         tensors={k: t for p in parts for k, t in p.tensors.items()}, layout="lowrank", tile=first.tile)
    return curv, {"passes": len(parts), "peak_factor_bytes": peak}
