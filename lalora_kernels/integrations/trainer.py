"""LaLoRA inside ``transformers.Trainer``: the penalty in ``compute_loss``, logged apart from the
task loss, the curvature saved in every checkpoint and restored on resume.

    trainer = LaLoRATrainer(model=peft_model, args=args, train_dataset=target_ds,
                            lalora_source=source_ds, lalora_lam=0.1)       # or lalora_curvature=curv
    trainer.train()

The penalty is added once per optimizer step whatever the gradient accumulation: the trainer's
own rule for whether it divides the loss by the accumulation steps decides how the penalty is
scaled. It is computed in fp32 outside autocast. With several processes every rank adds the same
(replicated) penalty, so DDP's gradient average leaves its gradient unchanged; with
``lalora_shard_factors=True`` each rank holds and evaluates only its share (see
``LaLoRARegularizer``). Under DeepSpeed ZeRO-3 the penalty gathers the LoRA weights; a model built
under ``deepspeed.zero.Init`` (partitioned before any engine exists, so it cannot run a forward
on its own) has its curvature estimated on the engine when ``train()`` starts, before the first step.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional

import torch
from transformers import TrainerCallback

from ..capture import estimate_curvature
from ..curvature import LoRACurvature
from ..penalty import LaLoRARegularizer

CURVATURE_FILE = "lalora_curvature.safetensors"


class LaLoRATrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass (``class T(LaLoRATrainerMixin, Trainer)``).

    lalora_curvature: a ``LoRACurvature``; or lalora_source: a dataset (batched with the trainer's
    collator) or an iterable of batches to estimate one from, with ``lalora_variant``,
    ``lalora_fisher`` and at most ``lalora_max_batches`` batches (under torch.distributed each
    rank estimates on its own batches and the factors are reduced). lalora_lam,
    lalora_prior_precision, lalora_normalize, lalora_shard_factors: as in ``LaLoRARegularizer``.
    """

    def __init__(self, *args, lalora_curvature: Optional[LoRACurvature] = None,
                 lalora_source: Optional[Iterable] = None, lalora_lam: float = 1.0,
                 lalora_prior_precision: float = 0.0, lalora_normalize: Optional[str] = "mean_diag",
                 lalora_variant: str = "kfac", lalora_fisher: str = "empirical",
                 lalora_max_batches: Optional[int] = 8, lalora_shard_factors: bool = False,
                 lalora_allow_missing_curvature: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._lalora_cfg = dict(lam=lalora_lam, prior_precision=lalora_prior_precision,
                                normalize=lalora_normalize, shard_factors=lalora_shard_factors)
        self._lalora_sums = {"lalora_penalty": 0.0, "task_loss": 0.0, "n": 0}
        self._lalora_allow_missing = lalora_allow_missing_curvature
        self.lalora_curvature, self.lalora, self._lalora_pending = None, None, None
        if lalora_curvature is not None:
            self._lalora_set(lalora_curvature)
            return
        if lalora_source is None:
            raise ValueError("pass lalora_curvature (a LoRACurvature) or lalora_source (source data to "
                             "estimate it from)")
        capture = dict(batches=self._lalora_batches(lalora_source), variant=lalora_variant, fisher=lalora_fisher,
                       max_batches=lalora_max_batches,
                       progress=self.args.disable_tqdm is False and self.is_world_process_zero())
        if _zero3_partitioned(self.model):
            # built under deepspeed.zero.Init: the forward runs only inside the engine that train()
            # builds, so the capture waits for it (before the first step, the LoRA weights unchanged)
            self._lalora_pending = capture
            self.add_callback(_CaptureAtTrainBegin(self))
        else:
            self._lalora_set(estimate_curvature(self.model, **capture))

    def _lalora_batches(self, source):
        """Batches from what a user passes as ``lalora_source``, made the way Trainer makes the train
        set's: a ``datasets.Dataset`` or any map-style dataset, or a list of examples (dicts with one
        sequence each), has the columns the model's forward does not take dropped (when
        ``remove_unused_columns``) and is collated by the trainer's collator; a DataLoader or a list of
        ready batches (dicts of 2-D tensors) is used as it is."""
        if isinstance(source, torch.utils.data.DataLoader):
            return source
        if isinstance(source, (list, tuple)):
            first = source[0] if source else None
            ids = first.get("input_ids") if isinstance(first, dict) else None
            if ids is None or (isinstance(ids, torch.Tensor) and ids.dim() >= 2):
                return source                     # ready batches (or nothing: estimate_curvature says so)
        if hasattr(source, "__getitem__") and hasattr(source, "__len__"):
            collate = self.data_collator
            try:
                import datasets
                is_hf = isinstance(source, datasets.Dataset)
            except ImportError:
                is_hf = False
            if is_hf:
                source = self._remove_unused_columns(source, description="lalora_source")
            else:
                collate = self._get_collator_with_removed_columns(collate, description="lalora_source")
            return torch.utils.data.DataLoader(source, batch_size=self.args.per_device_train_batch_size,
                                               collate_fn=collate)
        return source

    def _lalora_set(self, curvature: LoRACurvature) -> None:
        self.lalora_curvature = curvature
        self.lalora = LaLoRARegularizer(curvature, **self._lalora_cfg).to(self.args.device)

    # ---- loss ---------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        if model.training:
            with torch.autocast(device_type=loss.device.type, enabled=False):
                penalty = self.lalora(self.accelerator.unwrap_model(model))
            scaled = getattr(self, "loss_is_scaled_for_ga", None)
            if scaled is None:
                scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) \
                    or self.compute_loss_func is not None
            steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
            sums = self._lalora_sums
            sums["lalora_penalty"] += self.lalora.full_value(penalty) / steps
            sums["task_loss"] += float(loss.detach().float().mean()) * (1 if scaled else 1 / steps)
            sums["n"] += 1 / steps
            loss = loss + (penalty / steps if scaled else penalty).to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        sums = self._lalora_sums
        if "loss" in logs and sums["n"] > 0:
            logs["lalora_penalty"] = round(sums["lalora_penalty"] / sums["n"], 6)
            logs["task_loss"] = round(sums["task_loss"] / sums["n"], 6)
            self._lalora_sums = {"lalora_penalty": 0.0, "task_loss": 0.0, "n": 0}
        super().log(logs, *args, **kwargs)

    # ---- checkpoints --------------------------------------------------------------------------
    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call=_internal_call)
        output_dir = output_dir or self.args.output_dir
        if self.is_world_process_zero() and self.lalora_curvature is not None:
            os.makedirs(output_dir, exist_ok=True)
            self.lalora_curvature.save(os.path.join(output_dir, CURVATURE_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint):
        # Trainer resumes the model through different methods under DeepSpeed, FSDP and neither;
        # this one runs on every resume, after the model is prepared and before the first step
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, CURVATURE_FILE)
        if os.path.exists(path):
            self._lalora_set(LoRACurvature.load(path, device=self.args.device))
            self._lalora_pending = None
        elif not self._lalora_allow_missing:
            raise FileNotFoundError(
                f"resuming from {checkpoint!r}, which holds no {CURVATURE_FILE}: the run would go on with the "
                "curvature this trainer was built with, not the one it was trained against. Restore the file, or "
                "pass lalora_allow_missing_curvature=True to keep the trainer's curvature")


def _zero3_partitioned(model) -> bool:
    from ..lora_layers import find_lora_layers, is_zero3_partitioned
    return is_zero3_partitioned(find_lora_layers(model)[0].A)


class _CaptureAtTrainBegin(TrainerCallback):
    """Estimates a pending curvature on the DeepSpeed engine once ``train()`` has built it."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        tr = self.trainer
        if tr._lalora_pending is not None:
            tr._lalora_set(estimate_curvature(tr.model_wrapped, **tr._lalora_pending))
            tr._lalora_pending = None


def make_lalora_trainer(base):
    """``LaLoRATrainerMixin`` on any Trainer subclass, e.g. ``make_lalora_trainer(trl.SFTTrainer)``."""
    return type(f"LaLoRA{base.__name__}", (LaLoRATrainerMixin, base), {})


def _plain_trainer():
    from transformers import Trainer
    return make_lalora_trainer(Trainer)


LaLoRATrainer = _plain_trainer()
