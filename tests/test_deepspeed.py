"""DeepSpeed on 2 gloo ranks (its CPU accelerator): under ZeRO-2 the LoRA weights stay whole and the
penalty is the single-process one; under ZeRO-3 they are partitioned (empty outside the forward),
which lalora_kernels refuses with one sentence on every rank instead of failing somewhere inside.
Across processes the HF Trainer cannot drive DeepSpeed on a CPU (it counts one process and rejects
the batch sizes), so the 2-rank test builds the engine with ``deepspeed.initialize``; the Trainer is
tested in one process."""
import json
import os
import subprocess
import sys

WORKER = r"""
import json, os, sys, warnings
import torch
warnings.simplefilter("ignore")
import deepspeed
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[1])))
from problems import batches, tiny_llama
from lalora_kernels import LaLoRARegularizer, estimate_curvature
deepspeed.init_distributed(dist_backend="gloo")
rank = int(os.environ["RANK"])
out = {}
data = batches(n=2, bsz=3, seq=6, seed=5, pad=False)
curv = estimate_curvature(tiny_llama(torch.float32), data, variant="kfac", progress=False)
for stage in (2, 3):
    model = tiny_llama(torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
    cfg = {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": 3,
           "gradient_accumulation_steps": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, config=cfg,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    got = {}
    for what, call in (("capture", lambda: estimate_curvature(engine, data[rank::2], progress=False)),
                       ("penalty", lambda: LaLoRARegularizer(curv, lam=2.0)(engine))):
        try:
            v = call()
            got[what] = float(v) if torch.is_tensor(v) else "ok"
        except Exception as exc:
            got[what] = f"{type(exc).__name__}: {exc}"
    if stage == 2:                   # and it trains: the penalty's gradient goes through the engine
        loss = engine(**data[rank]).loss + LaLoRARegularizer(curv, lam=2.0)(engine)
        engine.backward(loss)
        engine.step()
        got["step"] = "ok"
    out[f"zero{stage}"] = got
with open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w") as f:
    json.dump(out, f)
"""


def test_zero2_runs_and_zero3_is_refused_on_every_rank(tmp_path):
    import torch

    from problems import batches, tiny_llama

    from lalora_kernels import LaLoRARegularizer, estimate_curvature
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "XDG_CACHE_HOME": str(tmp_path / "c")}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), os.path.join(here, "problems.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    model = tiny_llama(torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
    curv = estimate_curvature(tiny_llama(torch.float32),
                              batches(n=2, bsz=3, seq=6, seed=5, pad=False), variant="kfac", progress=False)
    want = float(LaLoRARegularizer(curv, lam=2.0)(model))
    for rank in range(2):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert res["zero2"]["capture"] == "ok" and res["zero2"]["step"] == "ok"
        assert abs(res["zero2"]["penalty"] - want) <= 1e-5 * abs(want)
        for what in ("capture", "penalty"):
            msg = res["zero3"][what]
            assert msg.startswith("NotImplementedError: DeepSpeed ZeRO-3 partitions the LoRA weights"), msg
            assert "FSDP2" in msg


TRAINER = r"""
import json, os, sys, warnings
import torch
warnings.simplefilter("ignore")
sys.path.insert(0, sys.argv[1])
from problems import tiny_llama
from test_trainer import Rows
from transformers import TrainingArguments
from lalora_kernels.integrations import CURVATURE_FILE, LaLoRATrainer
out = {}
for stage in (2, 3):
    ds = {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto",
          "gradient_accumulation_steps": "auto", "train_batch_size": "auto", "gradient_clipping": "auto",
          "optimizer": {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True}}}
    run = os.path.join(sys.argv[2], f"zero{stage}")
    args = TrainingArguments(output_dir=run, max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                             logging_steps=1, save_steps=2, report_to=[], disable_tqdm=True, seed=0, deepspeed=ds)
    try:
        tr = LaLoRATrainer(model=tiny_llama(torch.float32), args=args, train_dataset=Rows(8, seed=3),
                           lalora_source=Rows(4, seed=4), lalora_variant="wkfac", lalora_lam=5.0)
        tr.train()
        logged = [l["lalora_penalty"] for l in tr.state.log_history if "lalora_penalty" in l]
        saved = os.path.exists(os.path.join(run, "checkpoint-2", CURVATURE_FILE))
        out[stage] = {"penalties": logged, "saved": saved}
    except Exception as exc:
        out[stage] = f"{type(exc).__name__}: {exc}"
with open(os.path.join(sys.argv[2], "trainer.json"), "w") as f:
    json.dump(out, f)
"""


def test_trainer_with_zero2_trains_and_with_zero3_is_refused_up_front(tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "XDG_CACHE_HOME": str(tmp_path / "c")}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                          str(script), here, str(tmp_path)], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads((tmp_path / "trainer.json").read_text())
    assert res["2"]["saved"] and len(res["2"]["penalties"]) == 2 and res["2"]["penalties"][-1] > 0
    assert res["3"].startswith("NotImplementedError: DeepSpeed ZeRO-3 partitions the LoRA weights"), res["3"]
