"""The anti-forgetting methods a peft user can pick today, set up the way their authors define them.

* MiCA (``init_lora_weights="mica"``, peft): B fixed to the base weight's minor left singular vectors,
  only A trained.
* CorDA, knowledge-preserved mode (``init_lora_weights="corda"``, ``corda_method="kpm"``, peft): the
  adapter is initialised from the components of ``W C`` (C: the covariance of the layer's inputs on
  source data) that matter least to the source, and those components are taken out of the base.
* MIGU (below): masks gradients by output magnitude.
"""
from __future__ import annotations

import torch
from torch import nn

from ..tiny import ALL_PROJ, add_lora


def corda_model(base: nn.Module, source: list[dict], *, r: int, targets=ALL_PROJ, alpha: int = 16) -> nn.Module:
    """peft's CorDA in knowledge-preserved mode, its covariance from the ``source`` batches."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                     init_lora_weights="corda", corda_config=CordaConfig(corda_method="kpm"))

    @torch.no_grad()
    def run_model():                 # peft's CorDA hooks read one sequence per forward
        for b in source:
            for row in b["input_ids"]:
                base(input_ids=row[None])
    preprocess_corda(base, cfg, run_model=run_model)
    return get_peft_model(base, cfg)


def mica_model(base: nn.Module, *, r: int, targets=ALL_PROJ, alpha: int = 16) -> nn.Module:
    return add_lora(base, r=r, alpha=alpha, targets=targets, init_lora_weights="mica")


class MIGU:
    """MIGU, magnitude-based gradient updating (Du et al., 2024, "Unlocking Continual Learning
    Abilities in Language Models"): in every linear layer, the L1 norm of each output feature over
    the batch's tokens is taken in the forward pass and normalised over the layer's outputs; in the
    backward pass only the weight rows whose outputs rank in the top ``ratio`` share are updated, the
    other rows' gradients are set to zero. Here the trainable linear layers are LoRA's: ``lora_A``
    (its r outputs) and ``lora_B`` (the adapted layer's outputs, base plus LoRA, as MIGU reads the
    layer's own output). ``ratio`` is MIGU's threshold T: 1 is plain LoRA, smaller keeps more."""

    def __init__(self, model: nn.Module, ratio: float):
        from peft.tuners.lora import LoraLayer
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio={ratio} must be in (0, 1]")
        self.ratio, self.magnitude, self.handles = ratio, {}, []
        for module in model.modules():
            if isinstance(module, LoraLayer):
                name = module.active_adapters[0]
                a, b = module.lora_A[name], module.lora_B[name]
                self.handles.append(a.register_forward_hook(self._record(a.weight)))
                self.handles.append(module.register_forward_hook(self._record(b.weight)))

    def _record(self, weight: torch.Tensor):
        def hook(mod, args, out):
            if torch.is_grad_enabled():
                m = out.detach().abs().flatten(0, -2).sum(0)
                self.magnitude[weight] = m / m.sum().clamp_min(1e-30)
        return hook

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Call between ``backward()`` and ``optimizer.step()``."""
        for weight, m in self.magnitude.items():
            if weight.grad is None:
                continue
            keep = max(1, round(self.ratio * m.numel()))
            mask = torch.zeros_like(m, dtype=torch.bool)
            mask[m.topk(keep).indices] = True
            weight.grad[~mask] = 0
        self.magnitude.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
