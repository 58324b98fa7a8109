"""LaLoRA under FSDP2: a model sharded with torch's fully_shard, curvature from per-rank shards of the
source data (the capture runs on the sharded model), training with the penalty on sharded LoRA weights.

    torchrun --standalone --nproc_per_node=2 examples/lalora_fsdp.py [--shard-factors] [--bf16]

CPU ranks use gloo, GPU ranks nccl (one GPU per rank). Every rank must run every forward, backward
and penalty call (each gathers shards); the penalty's gradient reaches each LoRA shard once, whatever
FSDP does with the task loss's. --bf16 uses FSDP's mixed precision (bf16 compute, fp32 master weights
and gradient reduction). Uses the demo's embedded tasks: the base is pre-trained on the source task
(cached), LoRA is fine-tuned on the target task with the penalty.
"""
import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from lalora_kernels import LaLoRARegularizer, estimate_curvature
from lalora_kernels.apps.demo_tasks import accuracy, lm_loss, pretrained_base, task_batches
from lalora_kernels.apps.tiny import add_lora


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--lam", type=float, default=10.0)
    ap.add_argument("--variant", default="wkfac")
    ap.add_argument("--shard-factors", action="store_true", help="each rank keeps only its share of factors")
    ap.add_argument("--bf16", action="store_true", help="FSDP mixed precision: bf16 params, fp32 reduce")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        if rank == 0:
            pretrained_base(progress=False)          # fill the cache once
        dist.barrier()
        torch.manual_seed(0)                         # the same LoRA init on every rank
        model = add_lora(pretrained_base(progress=False), r=8).to(device)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.bf16 \
            else MixedPrecisionPolicy()
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        proxy = task_batches("source", 2 * world, seed=11)[rank::world]     # this rank's shard
        curv = estimate_curvature(model, proxy, variant=args.variant, progress=False)
        reg = LaLoRARegularizer(curv, lam=args.lam, shard_factors=args.shard_factors).to(device)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
        for step, batch in enumerate(task_batches("target", args.steps, seed=12)):
            local = {k: v[rank::world].to(device) for k, v in batch.items()}
            task = lm_loss(model, local)
            penalty = reg(model)
            (task + penalty).backward()
            opt.step()
            opt.zero_grad()
            full = reg.full_value(penalty)
            if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
                print(f"step {step:3d}  task {float(task.detach()):.4f}  penalty {full:.4f}", flush=True)
        model.eval()
        src, tgt = accuracy(model, task_batches("source", 2, seed=13)), accuracy(model, task_batches("target", 2, seed=14))
        factors = reg.penalty.memory_bytes() if reg.penalty is not None else 0
        print(f"rank {rank}: factor bytes held {factors}, source acc {src:.3f}, target acc {tgt:.3f}", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
