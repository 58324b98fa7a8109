"""DeepSpeed ZeRO on gloo ranks (its CPU accelerator), against one process on all the data: the
curvature estimated on the engine (each rank its shard), the penalty's value with the factors
replicated or sharded, and a 3-step training trajectory, under ZeRO-2 (LoRA weights whole) and
ZeRO-3 (partitioned, empty outside the forward). Across processes the HF Trainer cannot drive
DeepSpeed on a CPU (it counts one process and rejects the batch sizes), so the multi-rank test
builds the engine with ``deepspeed.initialize``; the Trainer is tested in one process, where it
trains, checkpoints and resumes with the curvature under ZeRO-2, ZeRO-3, and ZeRO-3 with a model
built under ``zero.Init``."""
import json
import os
import subprocess
import sys

import pytest

STEPS, LAM, LR = 3, 2.0, 0.01

WORKER = r"""
import json, os, sys, warnings
import torch
warnings.simplefilter("ignore")
import deepspeed
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[1])))
from problems import batches, tiny_llama
from lalora_kernels import LaLoRARegularizer, estimate_curvature
STEPS, LAM, LR = int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
deepspeed.init_distributed(dist_backend="gloo")
rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
data = batches(n=6, bsz=3, seq=6, seed=5, pad=False)


def model():
    m = tiny_llama(torch.float32).eval()      # eval: no LoRA dropout, so every run draws the same
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
    return m


def lora(m, zero3):
    params = [(n, p) for n, p in m.named_parameters() if "lora_" in n]
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=zero3):
        return {n: p.detach().clone() for n, p in params}


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# one process on all the data: the curvature at the start, then SGD on the mean of the ranks'
# batches plus the penalty (zero at the start, then steering every step after the first)
ref = model()
start = lora(ref, False)
curv = estimate_curvature(ref, data, variant="kfac", progress=False)
reg = LaLoRARegularizer(curv, lam=LAM)
opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=LR)
for step in range(STEPS):
    opt.zero_grad()
    loss = sum(ref(**data[(step * size + r) % len(data)]).loss for r in range(size)) / size + reg(ref)
    loss.backward()
    opt.step()
want, want_value = lora(ref, False), float(reg(ref))

out = {}
for stage, shard in ((2, False), (3, False), (3, True)):
    m = model()
    # every parameter partitioned, however small (DeepSpeed keeps those under 1e5 elements whole)
    cfg = {"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
           "train_micro_batch_size_per_gpu": 3,
           "gradient_accumulation_steps": 1, "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True}
    params = [p for p in m.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=m, config=cfg, optimizer=torch.optim.SGD(params, lr=LR))
    zero3 = stage == 3
    # estimated on the engine, which then trains: the proxy passes must leave it no gradient
    mine = estimate_curvature(engine, data[rank::size], variant="kfac", progress=False)
    got = {"curvature": max(rel(mine.tensors[k], curv.tensors[k]) for k in curv.tensors)}
    r = LaLoRARegularizer(mine, lam=LAM, shard_factors=shard)
    if zero3:       # before the forward its gradient would reach weights already partitioned again
        try:
            r(engine)
            got["before_forward"] = "no error"
        except RuntimeError as exc:
            got["before_forward"] = str(exc)
    for step in range(STEPS):
        loss = engine(**data[(step * size + rank) % len(data)]).loss + r(engine)
        engine.backward(loss)
        engine.step()
    now = lora(m, zero3)
    got["trajectory"] = max(rel(now[n], want[n]) for n in want)
    got["moved"] = max(rel(now[n], start[n]) for n in want)
    with torch.no_grad():
        got["value"] = abs(r.full_value(r(engine)) - want_value) / want_value
    out[f"zero{stage}{'-sharded' if shard else ''}"] = got
with open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w") as f:
    json.dump(out, f)
"""


@pytest.fixture(scope="module")
def ds_cache(tmp_path_factory):
    """One cache for the file: DeepSpeed compiles its CPU communication op once, not per test."""
    return tmp_path_factory.mktemp("deepspeed-cache")


def _env(cache):
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "XDG_CACHE_HOME": str(cache)}


@pytest.mark.parametrize("ranks", [2, 3])
def test_zero_engines_follow_one_process(tmp_path, ranks, ds_cache):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    here = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                          str(script), os.path.join(here, "problems.py"), str(tmp_path), str(STEPS), str(LAM), str(LR)],
                         capture_output=True, text=True, timeout=600, env=_env(ds_cache))
    assert run.returncode == 0, run.stderr[-3000:]
    for rank in range(ranks):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert set(res) == {"zero2", "zero3", "zero3-sharded"}
        for engine in ("zero3", "zero3-sharded"):
            assert res[engine].pop("before_forward").startswith("under DeepSpeed ZeRO-3 the penalty's gradient")
        for engine, got in res.items():        # fp32 throughout: the sums of other shapes round differently
            assert got["curvature"] <= 1e-5, (engine, got)
            assert got["value"] <= 1e-5, (engine, got)
            assert got["trajectory"] <= 1e-5, (engine, got)
            assert got["moved"] >= 1e-3, (engine, got)      # the steps did move the LoRA weights


TRAINER = r"""
import json, os, sys, warnings
import torch
warnings.simplefilter("ignore")
import deepspeed
from transformers import TrainingArguments
sys.path.insert(0, sys.argv[1])
from problems import batches, tiny_llama
from test_trainer import Rows
from lalora_kernels import estimate_curvature
from lalora_kernels.integrations import CURVATURE_FILE, LaLoRATrainer
from lalora_kernels.lora_layers import find_lora_layers, is_zero3_partitioned
deepspeed.init_distributed(dist_backend="gloo")


def ds(stage):
    return {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "train_batch_size": "auto", "gradient_clipping": "auto",
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}}}


def model(init):
    plain = tiny_llama(torch.float32)
    if not init:
        return plain
    # the same weights, partitioned from the start as from_pretrained under a ZeRO-3 config makes them
    with deepspeed.zero.Init(config_dict_or_path={"zero_optimization": {"stage": 3},
                                                  "train_micro_batch_size_per_gpu": 2}):
        m = tiny_llama(torch.float32)
    with deepspeed.zero.GatheredParameters(list(m.parameters()), modifier_rank=0), torch.no_grad():
        for (n, p), (n2, q) in zip(m.named_parameters(), plain.named_parameters()):
            p.copy_(q)
    return m


def trainer(run, stage, init, steps, ckpt=False, **kw):
    args = TrainingArguments(output_dir=run, max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-2,
                             logging_steps=1, save_steps=2, report_to=[], disable_tqdm=True, seed=0, deepspeed=ds(stage),
                             activation_checkpointing=ckpt, activation_checkpointing_kwargs={"use_reentrant": False})
    m = model(init)
    partitioned = is_zero3_partitioned(find_lora_layers(m)[0].A)
    return LaLoRATrainer(model=m, args=args, train_dataset=Rows(8, seed=3), lalora_variant="wkfac",
                         lalora_lam=5.0, **kw), partitioned


out = {}
other = estimate_curvature(tiny_llama(torch.float32), batches(n=1, bsz=4, seq=8, seed=11, pad=False),
                           variant="wkfac", progress=False)
for name, stage, init, ckpt in (("zero2", 2, False, False), ("zero3", 3, False, False),
                                ("zero3-init", 3, True, False), ("zero3-checkpointing", 3, False, True)):
    run = os.path.join(sys.argv[2], name)
    tr, partitioned = trainer(run, stage, init, 3, ckpt, lalora_source=Rows(4, seed=4))
    tr.train()
    logged = [l["lalora_penalty"] for l in tr.state.log_history if "lalora_penalty" in l]
    ckpt = os.path.join(run, "checkpoint-2")
    saved = tr.lalora_curvature
    # resumed by a trainer given another curvature: the checkpoint's must win
    again, _ = trainer(run, stage, init, 3, ckpt, lalora_curvature=other)
    again.train(resume_from_checkpoint=ckpt)
    resumed = [l["lalora_penalty"] for l in again.state.log_history if "lalora_penalty" in l]
    out[name] = {"partitioned_before_train": partitioned, "penalties": logged, "resumed": resumed,
                 "saved": os.path.exists(os.path.join(ckpt, CURVATURE_FILE)),
                 "restored": all(torch.equal(again.lalora_curvature.tensors[k].cpu(), saved.tensors[k].cpu())
                                 for k in saved.tensors),
                 "other_differs": any(not torch.equal(other.tensors[k], saved.tensors[k].cpu()) for k in saved.tensors)}
with open(os.path.join(sys.argv[2], "trainer.json"), "w") as f:
    json.dump(out, f)
"""


def test_trainer_under_zero2_zero3_and_zero_init_trains_checkpoints_and_resumes(tmp_path, ds_cache):
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    here = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                          str(script), here, str(tmp_path)], capture_output=True, text=True, timeout=600,
                         env=_env(ds_cache))
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads((tmp_path / "trainer.json").read_text())
    assert [res[k]["partitioned_before_train"] for k in ("zero2", "zero3", "zero3-init", "zero3-checkpointing")] \
        == [False, False, True, False]
    want = res["zero2"]["penalties"]
    assert len(want) == 3 and want[0] == 0.0 and want[-1] > 0      # the anchors are the start: 0, then grows
    for name, got in res.items():
        assert got["saved"] and got["restored"] and got["other_differs"], (name, got)
        for a, b in zip(got["penalties"], want):             # ZeRO-3 gathers; ZeRO-2 reads the weights
            assert abs(a - b) <= 1e-4 * max(abs(b), 1e-6), (name, got["penalties"], want)
        assert got["resumed"] and abs(got["resumed"][-1] - got["penalties"][-1]) <= 1e-4 * got["penalties"][-1], \
            (name, got)


def test_deepspeed_example(tmp_path, ds_cache):
    import re
    root = os.path.dirname(os.path.dirname(__file__))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          os.path.join(root, "examples", "lalora_deepspeed.py"), "--steps", "4", "--shard-factors"],
                         capture_output=True, text=True, timeout=600, env=_env(ds_cache), cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    held = [int(h) for h in re.findall(r"ZeRO-3, factor bytes held (\d+)", run.stdout)]
    assert len(held) == 2 and all(h > 0 for h in held)
    penalties = [float(p) for p in re.findall(r"penalty ([0-9.]+)", run.stdout)]
    assert penalties and penalties[-1] > 0
