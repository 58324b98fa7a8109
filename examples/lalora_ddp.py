"""LaLoRA under torch.distributed: curvature from per-rank shards, DDP training with the penalty.

    torchrun --standalone --nproc_per_node=2 examples/lalora_ddp.py [--shard-factors]
    accelerate launch --multi_gpu --num_processes 2 examples/lalora_ddp.py [--shard-factors]

CPU ranks use gloo, GPU ranks nccl (one GPU per rank). `--multi_gpu` only picks accelerate's
torch.distributed launcher and works on CPU too (checked with accelerate 1.15). Uses the demo's
embedded tasks: the base is pre-trained on the source task (cached), LoRA is fine-tuned on the
target task with the penalty.
"""
import argparse
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from lalora_kernels import LaLoRARegularizer, estimate_curvature
from lalora_kernels.apps.demo_tasks import accuracy, lm_loss, pretrained_base, task_batches
from lalora_kernels.apps.tiny import add_lora


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--lam", type=float, default=10.0)
    ap.add_argument("--variant", default="wkfac")
    ap.add_argument("--shard-factors", action="store_true", help="each rank keeps only its share of factors")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        if rank == 0:
            pretrained_base(progress=False)          # fill the cache once
        dist.barrier()
        torch.manual_seed(0)
        model = add_lora(pretrained_base(progress=False), r=8).to(device)
        proxy = task_batches("source", 2 * world, seed=11)[rank::world]     # this rank's shard
        curv = estimate_curvature(model, proxy, variant=args.variant, progress=False)
        reg = LaLoRARegularizer(curv, lam=args.lam, shard_factors=args.shard_factors).to(device)
        ddp = DDP(model, device_ids=[device.index] if cuda else None)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
        for step, batch in enumerate(task_batches("target", args.steps, seed=12)):
            local = {k: v[rank::world].to(device) for k, v in batch.items()}
            task = lm_loss(ddp, local)
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
