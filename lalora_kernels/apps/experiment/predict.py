"""Does the curvature predict forgetting? For each variant and init: the penalty's quadratic
``1/2 d^T F d`` (lam = 1, no normalisation, no prior: the Laplace prediction of the source loss's
increase) against the measured increase of the held-out source NLL, at points ``theta* + d`` along
random directions and along a plain-LoRA fine-tuning trajectory. Reported per variant: Spearman's
rank correlation (does a larger prediction mean more forgetting?) and the median ratio predicted /
measured (is the scale right?)."""
from __future__ import annotations

import copy
import warnings

import torch

from ...capture import DegenerateCurvatureWarning, estimate_curvature
from ...lora_layers import find_lora_layers
from ...penalty import LaplacePenalty
from . import tasks
from .runner import VARIANTS, Runner, Setting


def spearman(x: list[float], y: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        for k, i in enumerate(order):
            r[i] = float(k)
        return torch.tensor(r)
    a, b = ranks(x), ranks(y)
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-30))


def _weights(model):
    refs = find_lora_layers(model)
    return [r.A.detach().clone() for r in refs], [r.B.detach().clone() for r in refs]


def _set(model, A, B):
    with torch.no_grad():
        for r, a, b in zip(find_lora_layers(model), A, B):
            r.A.copy_(a)
            r.B.copy_(b)


def points(runner: Runner, init: str, setting: Setting, n_random: int = 8, every: int = 20):
    """The anchor, and (kind, A, B) points: random directions at three scales, and a trajectory."""
    anchor = runner.anchor(init, setting)
    A0, B0 = _weights(anchor)
    model = copy.deepcopy(anchor)
    torch.manual_seed(setting.seed)              # plain LoRA, as runner.finetune trains it
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=setting.lr, weight_decay=0.0)
    trajectory = []
    model.train()
    for t, b in enumerate(runner.data.batches(setting), 1):
        tasks.lm_loss(model, b).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if t % every == 0:
            trajectory.append(_weights(model))
    model.eval()
    # the size of a whole fine-tuning's move sets the random directions' scale
    end_A, end_B = trajectory[-1]
    move = torch.cat([(a - a0).flatten() for a, a0 in zip(end_A + end_B, A0 + B0)]).norm()
    g = torch.Generator().manual_seed(3)
    randoms = []
    for scale in (0.25, 0.5, 1.0):
        for _ in range(n_random):
            d = [torch.randn(t.shape, generator=g) for t in A0 + B0]
            norm = torch.cat([x.flatten() for x in d]).norm()
            d = [x * (scale * move / norm) for x in d]
            randoms.append(([a + x for a, x in zip(A0, d[:len(A0)])], [b + x for b, x in zip(B0, d[len(A0):])]))
    return anchor, [("random", A, B) for A, B in randoms] + [("trajectory", A, B) for A, B in trajectory]


def prediction_rows(runner: Runner, setting: Setting, inits=("zero", "pissa"), variants=VARIANTS,
                    n_random: int = 8) -> list[dict]:
    rows = []
    for init in inits:
        anchor, pts = points(runner, init, setting, n_random)
        base_nll = tasks.source_metrics(anchor, runner.data.eval_source)["source_nll"]
        probe = copy.deepcopy(anchor)
        measured = []
        for _, A, B in pts:
            _set(probe, A, B)
            measured.append(tasks.source_metrics(probe, runner.data.eval_source)["source_nll"] - base_nll)
        for v in variants:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DegenerateCurvatureWarning)
                curv = estimate_curvature(anchor, runner.data.proxy_for(setting.proxy_batches), variant=v,
                                          progress=False)
            pen = LaplacePenalty(curv, lam=1.0, normalize=None)
            with torch.no_grad():
                predicted = [float(pen(A, B)) for _, A, B in pts]
            for kind in ("random", "trajectory", "all"):
                idx = [i for i, (k, _, _) in enumerate(pts) if kind in ("all", k)]
                p, m = [predicted[i] for i in idx], [measured[i] for i in idx]
                ratios = sorted(a / b for a, b in zip(p, m) if b > 1e-9)
                rows.append({"init": init, "variant": v, "points": kind, "n": len(idx),
                             "spearman": round(spearman(p, m), 3),
                             "median_ratio": round(ratios[len(ratios) // 2], 3) if ratios else None,
                             "predicted": p, "measured": m})
    return rows
