"""``LaLoRATrainer`` under accelerate's FSDP plugin (``fsdp_version: 2``) on 2 gloo ranks, against the
same run under DDP: the same penalties and task losses step by step (factors replicated, or each
rank holding its share), LoRA weights sharded as DTensors, the curvature saved with a sharded
checkpoint and restored on resume.

accelerate turns its FSDP plugin on only for accelerator processes (CUDA, XPU, NPU, ...); on CPU
processes it silently runs DDP. The worker lifts exactly that gate (``AcceleratorState`` keeps the
plugin on ``MULTI_CPU``), so that everything after it is accelerate's and transformers' own FSDP2
code: ``fully_shard`` on every decoder layer and the model, sharded state dicts, resume."""
import json
import os
import subprocess
import sys

WORKER = r"""
import json, os, sys, warnings
import torch
warnings.simplefilter("ignore")
sys.path.insert(0, sys.argv[1])
import accelerate.state
from accelerate.utils import DistributedType

_init = accelerate.state.AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin


accelerate.state.AcceleratorState.__init__ = _fsdp_on_cpu
from transformers import TrainingArguments
from problems import batches, tiny_llama
from test_trainer import Rows
from lalora_kernels import estimate_curvature
from lalora_kernels.integrations import CURVATURE_FILE, LaLoRATrainer
from lalora_kernels.lora_layers import find_lora_layers, is_sharded

mode, out = sys.argv[2], sys.argv[3]
rank = int(os.environ["RANK"])
fsdp = dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2, "state_dict_type": "SHARDED_STATE_DICT",
                                            "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})


def trainer(**kw):
    args = TrainingArguments(output_dir=os.path.join(out, mode), max_steps=3, per_device_train_batch_size=2,
                             learning_rate=1e-2, logging_steps=1, save_steps=2, report_to=[], disable_tqdm=True,
                             seed=0, use_cpu=True, **(fsdp if mode.startswith("fsdp") else {}))
    return LaLoRATrainer(model=tiny_llama(torch.float32), args=args, train_dataset=Rows(16, seed=3),
                         lalora_variant="wkfac", lalora_lam=5.0, lalora_shard_factors=mode == "fsdp-sharded", **kw)


def logged(tr, key):
    return [l[key] for l in tr.state.log_history if key in l]


tr = trainer(lalora_source=Rows(8, seed=4))
tr.train()
res = {"fsdp_enabled": tr.is_fsdp_enabled, "penalties": logged(tr, "lalora_penalty"),
       "task": logged(tr, "task_loss"), "sharded": is_sharded(find_lora_layers(tr.model)[0].A)}
if mode == "fsdp":       # resumed by a trainer given another curvature: the checkpoint's must win
    saved = tr.lalora_curvature
    other = estimate_curvature(tiny_llama(torch.float32), batches(n=1, bsz=4, seq=8, seed=11, pad=False),
                               variant="wkfac", progress=False)
    again = trainer(lalora_curvature=other)
    ckpt = os.path.join(out, mode, "checkpoint-2")
    again.train(resume_from_checkpoint=ckpt)
    res.update(saved=os.path.exists(os.path.join(ckpt, CURVATURE_FILE)), resumed=logged(again, "lalora_penalty"),
               restored=all(torch.equal(again.lalora_curvature.tensors[k], saved.tensors[k]) for k in saved.tensors),
               other_differs=any(not torch.equal(other.tensors[k], saved.tensors[k]) for k in saved.tensors))
with open(os.path.join(out, f"{mode}{rank}.json"), "w") as f:
    json.dump(res, f)
"""


def test_trainer_under_accelerate_fsdp2_equals_ddp_and_resumes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "c")}
    for mode in ("ddp", "fsdp", "fsdp-sharded"):
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              str(script), here, mode, str(tmp_path)], capture_output=True, text=True, timeout=600,
                             env=env)
        assert run.returncode == 0, (mode, run.stderr[-3000:])
    for rank in range(2):
        ddp = json.loads((tmp_path / f"ddp{rank}.json").read_text())
        assert (ddp["fsdp_enabled"], ddp["sharded"]) == (False, False)
        assert len(ddp["penalties"]) == 3 and ddp["penalties"][0] == 0.0 and ddp["penalties"][-1] > 0
        for mode in ("fsdp", "fsdp-sharded"):      # factors replicated, then each rank holding its share
            got = json.loads((tmp_path / f"{mode}{rank}.json").read_text())
            assert (got["fsdp_enabled"], got["sharded"]) == (True, True)
            for key in ("penalties", "task"):      # logged rounded to 6 digits
                for a, b in zip(got[key], ddp[key], strict=True):
                    assert abs(a - b) <= 1e-5 * max(abs(b), 1.0), (mode, key, got[key], ddp[key])
        got = json.loads((tmp_path / f"fsdp{rank}.json").read_text())
        assert got["saved"] and got["restored"] and got["other_differs"], got
        assert abs(got["resumed"][-1] - got["penalties"][-1]) <= 1e-5 * got["penalties"][-1], got
