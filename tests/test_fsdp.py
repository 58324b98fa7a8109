"""LaLoRA under FSDP2 (fully_shard) on 2 and 3 gloo ranks: the curvature of the union of the ranks'
shards, the penalty's value and gradient on sharded LoRA weights (factors replicated or sharded),
a short training run, and a bf16 mixed-precision policy, each against one process on all the data."""
import json
import os
import sys
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
STEPS, LAM, DELTA, LR = 3, 2.0, 0.1, 0.05


def _data():
    from problems import batches
    return batches(n=6, bsz=6, seq=6, seed=5, pad=False)


def _rms_norm_in_place_dtype(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _model(dtype=torch.float64):
    """The tiny Llama, its RMSNorm kept in the model's dtype: transformers rounds it through float32,
    and that rounding turns the last-bit differences between GEMMs of other shapes or thread counts
    (a rank's rows against all rows) into 1e-8 differences that would hide a float64 comparison."""
    import types

    from problems import tiny_llama
    model = tiny_llama(dtype)
    if dtype == torch.float64:
        for m in model.modules():
            if type(m).__name__ == "LlamaRMSNorm":
                m.forward = types.MethodType(_rms_norm_in_place_dtype, m)
    return model


def _perturb(model):
    """The same perturbation of the LoRA weights whether they are sharded or not."""
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                d = (0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64)).to(p.dtype)
                if hasattr(p, "device_mesh"):
                    from torch.distributed.tensor import distribute_tensor
                    d = distribute_tensor(d, p.device_mesh, p.placements, src_data_rank=None)
                p.add_(d)


def _lora(model):
    return [p for n, p in model.named_parameters() if "lora_" in n]


def _whole(p):
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().reshape(-1).tolist()


def _task_loss(model, rows):
    """Next-token cross-entropy on the logits as they come: transformers' own loss upcasts them to
    float32, whose rounding (1e-9 here) would hide a float64 comparison."""
    logits = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
    labels = rows["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100)


def _rows(rank, world):
    return slice(rank * 6 // world, (rank + 1) * 6 // world)


def _train(model, reg, batches, rank=None, world=1):
    """SGD on task loss + penalty. A rank takes its rows of each batch and FSDP averages the task
    gradient over ranks; the single process (``rank=None``) averages the same row groups' losses."""
    opt = torch.optim.SGD(_lora(model), lr=LR)
    model.eval()                                    # no dropout: the runs must see the same function
    for b in batches[:STEPS]:
        groups = range(world) if rank is None else [rank]
        task = sum(_task_loss(model, {k: v[_rows(r, world)] for k, v in b.items()}) for r in groups)
        loss = task / len(groups) + reg(model)
        loss.backward()
        opt.step()
        opt.zero_grad()


def _shard(model, mp_policy=None):
    from torch.distributed.fsdp import fully_shard
    kw = {} if mp_policy is None else {"mp_policy": mp_policy}
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def _worker(rank, world, init_file, out_dir):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from lalora_kernels import LaLoRARegularizer, estimate_curvature
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    warnings.simplefilter("ignore")
    out = {}
    try:
        data = _data()
        mine = data[rank::world]
        model = _shard(_model())
        curv = estimate_curvature(model, mine, variant="tri", progress=False)
        curv.save(os.path.join(out_dir, f"fsdp-rank{rank}.safetensors"))
        _perturb(model)
        for shard in (False, True):
            reg = LaLoRARegularizer(curv, lam=LAM, prior_precision=DELTA, shard_factors=shard)
            v = reg(model)
            v.backward()
            out[f"value shard={shard}"] = reg.full_value(v)
            out[f"grads shard={shard}"] = [_whole(p.grad) for p in _lora(model)]
            model.zero_grad()
        for shard in (False, True):
            m = _shard(_model())
            _perturb(m)
            _train(m, LaLoRARegularizer(curv, lam=LAM, prior_precision=DELTA, shard_factors=shard), data, rank,
                   world)
            out[f"trained shard={shard}"] = [_whole(p) for p in _lora(m)]
        m = _shard(_model(torch.float32), MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
        c16 = estimate_curvature(m, mine, variant="tri", progress=False)
        _perturb(m)
        reg = LaLoRARegularizer(c16, lam=LAM, prior_precision=DELTA)
        v = reg(m)
        v.backward()
        out["bf16 value"] = reg.full_value(v)
        out["bf16 grads"] = [_whole(p.grad) for p in _lora(m)]
        with open(os.path.join(out_dir, f"fsdp-rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


def _spawn(world, tmp_path):
    ctx = mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=False)
    deadline = time.time() + 600
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            raise AssertionError("the FSDP ranks did not finish")


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_follows_one_process(world, tmp_path):
    from lalora_kernels import LaLoRARegularizer, LoRACurvature, estimate_curvature
    _spawn(world, tmp_path)
    data = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = estimate_curvature(_model(), data, variant="tri", progress=False)
        single16 = estimate_curvature(_model(torch.float32), data, variant="tri", progress=False)
    for r in range(world):
        got = LoRACurvature.load(str(tmp_path / f"fsdp-rank{r}.safetensors"))
        for k in single.tensors:
            torch.testing.assert_close(got.dense(k), single.dense(k), rtol=1e-12, atol=1e-14)
    results = [json.loads((tmp_path / f"fsdp-rank{r}.json").read_text()) for r in range(world)]
    model = _model()
    _perturb(model)
    v = LaLoRARegularizer(single, lam=LAM, prior_precision=DELTA)(model)
    grads = torch.autograd.grad(v, _lora(model))
    for res in results:
        for shard in (False, True):
            assert res[f"value shard={shard}"] == pytest.approx(float(v), rel=1e-12)
            for got, want in zip(res[f"grads shard={shard}"], grads):
                torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want.reshape(-1), rtol=1e-10,
                                           atol=1e-13)
    trained = _model()
    _perturb(trained)
    _train(trained, LaLoRARegularizer(single, lam=LAM, prior_precision=DELTA), data, None, world)
    for res in results:
        for shard in (False, True):
            for got, want in zip(res[f"trained shard={shard}"], _lora(trained)):
                torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want.detach().reshape(-1),
                                           rtol=1e-9, atol=1e-12)
    m16 = _model(torch.float32)
    _perturb(m16)
    v16 = LaLoRARegularizer(single16, lam=LAM, prior_precision=DELTA)(m16)
    g16 = torch.autograd.grad(v16, _lora(m16))
    for res in results:                      # bf16 forward: factors from bf16 activations
        assert res["bf16 value"] == pytest.approx(float(v16), rel=2e-2)
        for got, want in zip(res["bf16 grads"], g16):
            want = want.reshape(-1)
            assert float((torch.tensor(got) - want).norm() / want.norm()) < 5e-2


def test_fsdp_example(tmp_path):
    import re
    import subprocess
    root = os.path.dirname(os.path.dirname(__file__))
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          os.path.join(root, "examples", "lalora_fsdp.py"), "--steps", "4", "--shard-factors",
                          "--bf16"], capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    held = [int(h) for h in re.findall(r"factor bytes held (\d+)", out.stdout)]
    assert len(held) == 2 and all(h > 0 for h in held)
    penalties = [float(p) for p in re.findall(r"penalty ([0-9.]+)", out.stdout)]
    assert penalties and penalties[-1] > 0
