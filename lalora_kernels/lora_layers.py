"""Finding the LoRA layers of a peft model and reading their weights."""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LoRALayerRef:
    name: str
    module: nn.Module          # the peft LoraLayer wrapping an nn.Linear
    adapter: str

    @property
    def A(self) -> torch.Tensor:
        return self.module.lora_A[self.adapter].weight

    @property
    def B(self) -> torch.Tensor:
        return self.module.lora_B[self.adapter].weight

    def is_live(self, A: torch.Tensor, B: torch.Tensor) -> bool:
        """Whether this layer still runs exactly this adapter, unmerged, with weights ``A``, ``B``.
        Called for every layer on every step, so it first reads peft's attributes directly (1-2 us a
        layer, 0.1-0.2 ms a step for 112 layers); anything unexpected falls back to the properties."""
        m = self.module
        try:
            state, mods = m.__dict__, m.__dict__["_modules"]
            if (state["_active_adapter"] in (self.adapter, [self.adapter]) and not state["merged_adapters"]
                    and mods["lora_A"]._modules[self.adapter]._parameters["weight"] is A
                    and mods["lora_B"]._modules[self.adapter]._parameters["weight"] is B):
                return True
        except (KeyError, TypeError, AttributeError):
            pass
        return ([a for a in m.active_adapters if a in m.lora_A] == [self.adapter]
                and not getattr(m, "merged", False) and m.lora_A[self.adapter].weight is A
                and m.lora_B[self.adapter].weight is B)

    @property
    def scaling(self) -> float:
        return float(self.module.scaling[self.adapter])

    @property
    def shape(self) -> tuple[int, int, int, float]:
        """(in_features, out_features, rank, scaling)."""
        r, i = whole_shape(self.A)
        return i, whole_shape(self.B)[0], r, self.scaling


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (FSDP2's sharded parameters)."""
    return type(t).__name__ == "DTensor" and hasattr(t, "full_tensor")


def is_zero3_partitioned(t: torch.Tensor) -> bool:
    """Whether ``t`` is a parameter DeepSpeed ZeRO-3 has partitioned (it carries ``ds_id``/``ds_status``)."""
    return hasattr(t, "ds_id") and hasattr(t, "ds_status")


def is_partitioned(t: torch.Tensor) -> bool:
    """Whether ``t`` is split across ranks: an FSDP2 DTensor or a ZeRO-3 parameter."""
    return is_sharded(t) or is_zero3_partitioned(t)


def whole_shape(t: torch.Tensor) -> tuple[int, ...]:
    """The shape of the whole parameter: ZeRO-3 keeps it in ``ds_shape`` (``t`` itself is empty
    outside the forward); a DTensor reports it as its shape."""
    return tuple(t.ds_shape) if is_zero3_partitioned(t) else tuple(t.shape)


@contextlib.contextmanager
def gathered_zero3(params: list[torch.Tensor]):
    """ZeRO-3 parameters whole for the duration (a collective: every rank enters with the same list,
    in the same order). Read-only: what is written into them inside is lost."""
    import deepspeed
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded (DTensor) or ZeRO-3 parameter, gathered (a collective); a plain
    tensor as it is."""
    if is_sharded(t):
        return t.full_tensor()
    if is_zero3_partitioned(t):
        with gathered_zero3([t]):
            return t.detach().clone()
    return t


class UncoveredParametersWarning(UserWarning):
    """Trainable tensors outside LoRA's A and B (``modules_to_save``, LoRA biases) get no penalty."""


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP's and DeepSpeed's (``module``) and torch.compile's (``_orig_mod``) wrappers."""
    while True:
        wrapper = type(model).__name__ in ("DistributedDataParallel", "DeepSpeedEngine")
        inner = getattr(model, "module", None) if wrapper else getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _linear_base(module: nn.Module) -> bool:
    """peft's LoRA runs the same math on ``nn.Linear`` and on GPT-2's ``Conv1D`` (transposed weight,
    ``fan_in_fan_out=True``): lora_A and lora_B are plain Linears either way."""
    base = module.get_base_layer()
    return isinstance(base, nn.Linear) or type(base).__name__ == "Conv1D"


def find_lora_layers(model: nn.Module) -> list[LoRALayerRef]:
    """Every peft LoRA layer that runs the model's active adapter, in module order. Layers without
    that adapter (another adapter covers other modules) are not part of it."""
    from peft.tuners.lora import LoraLayer

    model = unwrap(model)
    refs, actives = [], set()
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        active = [a for a in module.active_adapters if a in module.lora_A]
        actives.update(module.active_adapters)
        if not active:
            continue
        if len(active) > 1:
            raise ValueError(f"LoRA layer {name!r} has active adapters {active}; exactly one must be active: "
                             f"call model.set_adapter(name) first")
        adapter = active[0]
        if not _linear_base(module):
            raise ValueError(f"LoRA layer {name!r} wraps {type(module.get_base_layer()).__name__}; lalora_kernels "
                             "supports LoRA on linear layers (nn.Linear, Conv1D): leave it out of target_modules")
        if adapter in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(adapter):
            raise ValueError(f"LoRA layer {name!r} uses a LoRA variant (e.g. DoRA) for adapter "
                             f"{adapter!r}; only plain LoRA (optionally rslora) is supported")
        if getattr(module, "merged", False):
            raise ValueError(f"LoRA layer {name!r} is merged into its base weight; call "
                             "model.unmerge_adapter() before estimating or regularising")
        refs.append(LoRALayerRef(name, module, adapter))
    if not refs:
        if actives:
            raise ValueError(f"no LoRA layer holds the active adapter(s) {sorted(actives)}; set an adapter that "
                             "exists with model.set_adapter(name)")
        raise ValueError("the model has no peft LoRA layers; wrap it with peft.get_peft_model(model, "
                         "LoraConfig(target_modules=[...])) first")
    names = {r.adapter for r in refs}
    if len(names) > 1:
        raise ValueError(f"LoRA layers run different adapters {sorted(names)}; exactly one must be active: call "
                         "model.set_adapter(name) first")
    return refs


def uncovered_trainable(model: nn.Module, refs: list[LoRALayerRef]) -> list[str]:
    """Names of trainable parameters that are not the A/B weights of ``refs``: what the curvature,
    and so the penalty, does not cover (LoRA biases, ``modules_to_save``, ...)."""
    covered = {id(t) for r in refs for t in (r.A, r.B)}
    return [n for n, p in unwrap(model).named_parameters() if p.requires_grad and id(p) not in covered]


def _outside(*roots: str) -> int:
    """The ``stacklevel`` of the first frame (from ``warnings.warn``'s caller's caller) whose file is
    under none of ``roots``: the user's line, however many library frames stand between."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(roots):
        frame, level = frame.f_back, level + 1
    return level


def warn_uncovered(model: nn.Module, refs: list[LoRALayerRef]) -> None:
    """``UncoveredParametersWarning`` naming what ``uncovered_trainable`` finds, if anything, pointed
    at the user's line (outside lalora_kernels and ``torch.nn``'s module call)."""
    others = uncovered_trainable(model, refs)
    if others:
        here = os.path.dirname(os.path.abspath(__file__))
        warnings.warn(f"{len(others)} trainable tensors are not LoRA A/B weights, so the curvature does not cover "
                      f"them and the penalty leaves them free: {others[:6]}{' ...' if len(others) > 6 else ''}. "
                      "Freeze them (no modules_to_save, lora_bias=False) or regularise them yourself.",
                      UncoveredParametersWarning, stacklevel=_outside(here, os.path.dirname(nn.modules.__file__)))
