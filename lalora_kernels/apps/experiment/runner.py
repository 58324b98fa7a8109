"""The runs of ``lalora experiment``: every method over its strength grid, in four sweeps.

A run fine-tunes LoRA on the target task from the same pre-trained base with the same data, seed
and optimiser, and reports target exact match (learnt) and the held-out source NLL's increase over
the base (forgotten). Methods and their strength knob:

==================  ==========================  ====================================
method              LoRA init                   strength
==================  ==========================  ====================================
lora                zero B (peft default)       none
l2                  zero B                      delta (L2 to the anchor)
lalora-<variant>    zero B and pissa            lam (``mean_diag``-normalised)
mica                MiCA (peft)                 none
corda-kpm           CorDA KPM (peft)            none
corda-kpm+lalora    CorDA KPM                   lam (``kfac``: CorDA's B is non-zero)
migu                zero B                      1 / T (T: MIGU's share of rows updated)
==================  ==========================  ====================================
"""
from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from ...capture import DegenerateCurvatureWarning, estimate_curvature
from ...penalty import LaLoRARegularizer
from ..tiny import add_lora
from . import corpus, peers, tasks

VARIANTS = ("diag", "kfac", "tri", "wkfac")
LAMS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
MIGU_RATIOS = (0.7, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02)


@dataclass(frozen=True)
class Setting:
    """One fine-tuning setting (what the sweeps vary)."""
    steps: int = 200
    r: int = 8
    proxy_batches: int = 4
    lr: float = 3e-3
    bsz: int = 16
    seed: int = 0


@dataclass
class Data:
    base: Callable
    train: list
    eval_target: list
    eval_source: list
    proxy: dict = field(default_factory=dict)      # proxy_batches -> batches

    def batches(self, setting: Setting) -> list:
        """The training batches of a run: the first ``steps`` of the pool for seed 0, a draw of
        ``steps`` distinct batches from it for any other seed (the seed sweep: other data, other init)."""
        if setting.seed == 0:
            return self.train[:setting.steps]
        if setting.steps > len(self.train):
            raise ValueError(f"steps={setting.steps} exceeds the pool of {len(self.train)} training batches")
        g = torch.Generator().manual_seed(setting.seed)
        return [self.train[i] for i in torch.randperm(len(self.train), generator=g)[:setting.steps].tolist()]

    def proxy_for(self, n: int) -> list:
        if n not in self.proxy:
            self.proxy[n] = corpus.source_batches("train", n, bsz=16, seq=128, seed=11)
        return self.proxy[n]


def load_data(setting: Setting, *, eval_batches: int = 8, pretrain_steps: Optional[int] = None,
              progress: bool = True) -> Data:
    base = corpus.pretrained_base(progress, steps=pretrain_steps)
    return Data(base=lambda: copy.deepcopy(base),
                train=tasks.target_batches(2 * setting.steps, bsz=setting.bsz, seed=12),
                eval_target=tasks.target_batches(4, bsz=32, seed=14),
                eval_source=corpus.source_batches("eval", eval_batches, bsz=16, seq=128, seed=13))


def start_model(data: Data, init: str, setting: Setting):
    """The LoRA model before fine-tuning (the anchor)."""
    torch.manual_seed(setting.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if init == "mica":
            return peers.mica_model(data.base(), r=setting.r).eval()
        if init == "corda-kpm":
            return peers.corda_model(data.base(), data.proxy_for(setting.proxy_batches), r=setting.r).eval()
        return add_lora(data.base(), r=setting.r, init_lora_weights=True if init == "zero" else init).eval()


def finetune(model, data: Data, setting: Setting, reg=None, migu: Optional[peers.MIGU] = None) -> None:
    torch.manual_seed(setting.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=setting.lr, weight_decay=0.0)
    model.train()
    for b in data.batches(setting):
        loss = tasks.lm_loss(model, b)
        if reg is not None:
            loss = loss + reg(model)
        loss.backward()
        if migu is not None:
            migu.mask_gradients()
        torch.nn.utils.clip_grad_norm_(params, 1.0)      # as the HF Trainer does by default
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


@dataclass(frozen=True)
class Run:
    sweep: str
    method: str
    init: str
    strength: float
    setting: Setting


def method_runs(sweep: str, setting: Setting, methods: dict[str, tuple]) -> list[Run]:
    """``methods``: name -> (init, strengths)."""
    return [Run(sweep, m, init, s, setting) for m, (init, strengths) in methods.items() for s in strengths]


def main_methods(lams=LAMS, migu=MIGU_RATIOS) -> dict[str, tuple]:
    out = {"lora": ("zero", (0.0,)), "l2": ("zero", lams)}
    for init in ("zero", "pissa"):
        out.update({f"lalora-{v} ({init})": (init, lams) for v in VARIANTS})
    out.update({"mica": ("mica", (0.0,)), "corda-kpm": ("corda-kpm", (0.0,)),
                "corda-kpm+lalora-kfac": ("corda-kpm", lams), "migu": ("zero", tuple(1 / t for t in migu))})
    return out


class Runner:
    """Runs ``Run``s, caching anchors and curvatures, within a time budget."""

    def __init__(self, data: Data, deadline: float):
        self.data, self.deadline = data, deadline
        self.models: dict = {}
        self.curvs: dict = {}
        self.base_metrics = tasks.source_metrics(data.base().eval(), data.eval_source)

    def anchor(self, init: str, setting: Setting):
        key = (init, replace(setting, steps=0, lr=0.0))
        if key not in self.models:
            self.models[key] = start_model(self.data, init, setting)
        return self.models[key]

    def curvature(self, init: str, variant: str, setting: Setting):
        key = (init, variant, setting.r, setting.proxy_batches)
        if key not in self.curvs:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DegenerateCurvatureWarning)
                self.curvs[key] = (estimate_curvature(self.anchor(init, setting), self.data.proxy_for(
                    setting.proxy_batches), variant=variant, progress=False), time.perf_counter() - t0)
        return self.curvs[key]

    def run(self, run: Run) -> dict:
        row = {"sweep": run.sweep, "method": run.method, "init": run.init, "strength": run.strength,
               "r": run.setting.r, "steps": run.setting.steps, "proxy_batches": run.setting.proxy_batches,
               "seed": run.setting.seed}
        if time.monotonic() > self.deadline:
            return {**row, "skipped": "time budget"}
        t0 = time.perf_counter()
        model = copy.deepcopy(self.anchor(run.init, run.setting))
        reg, migu, curv_s = None, None, 0.0
        if run.method == "l2":
            curv, _ = self.curvature(run.init, "kfac", run.setting)     # anchors only: lam = 0
            reg = LaLoRARegularizer(curv, lam=0.0, prior_precision=run.strength)
        elif run.method == "migu":
            migu = peers.MIGU(model, 1 / run.strength)
        elif "lalora" in run.method:
            variant = run.method.split("lalora-")[1].split(" ")[0]
            curv, curv_s = self.curvature(run.init, variant, run.setting)
            reg = LaLoRARegularizer(curv, lam=run.strength)
        finetune(model, self.data, run.setting, reg, migu)
        src = tasks.source_metrics(model, self.data.eval_source)
        return {**row, "target_em": tasks.exact_match(model, self.data.eval_target), **src,
                "forgetting": src["source_nll"] - self.base_metrics["source_nll"],
                "curvature_s": round(curv_s, 3), "seconds": round(time.perf_counter() - t0, 2)}

    def run_all(self, runs: list[Run], progress: bool) -> list[dict]:
        return [self.run(r) for r in tqdm(runs, desc="fine-tuning runs", disable=not progress)]
