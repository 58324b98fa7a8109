"""LaLoRA under DeepSpeed ZeRO (stage 3 by default): the engine from deepspeed.initialize, curvature
from per-rank shards of the source data (the capture runs on the engine), training with the penalty
on partitioned LoRA weights.

    torchrun --standalone --nproc_per_node=2 examples/lalora_deepspeed.py [--stage 3] [--shard-factors]

CPU ranks use gloo (DeepSpeed's CPU accelerator), GPU ranks nccl. Every rank must run every forward,
backward and penalty call (ZeRO-3 gathers the partitioned weights collectively), and the penalty
comes after the step's forward: its gradient reaches the partitioned LoRA weights in that forward's
backward. Uses the demo's embedded tasks: the base is pre-trained on the source task (cached), LoRA is
fine-tuned on the target task with the penalty. With the HF Trainer, pass the same config as
``TrainingArguments(deepspeed=...)`` to ``LaLoRATrainer`` instead.
"""
import argparse
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
import deepspeed  # noqa: E402

from lalora_kernels import LaLoRARegularizer, estimate_curvature  # noqa: E402
from lalora_kernels.apps.demo_tasks import accuracy, lm_loss, pretrained_base, task_batches  # noqa: E402
from lalora_kernels.apps.tiny import add_lora  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--lam", type=float, default=10.0)
    ap.add_argument("--variant", default="wkfac")
    ap.add_argument("--stage", type=int, default=3, choices=(1, 2, 3), help="ZeRO stage")
    ap.add_argument("--shard-factors", action="store_true", help="each rank keeps only its share of factors")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if rank == 0:
        pretrained_base(progress=False)          # fill the cache once
    torch.distributed.barrier()
    torch.manual_seed(0)                         # the same LoRA init on every rank
    model = add_lora(pretrained_base(progress=False), r=8)
    bsz = 16 // world
    config = {"train_micro_batch_size_per_gpu": bsz, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": args.stage},
              "optimizer": {"type": "AdamW", "params": {"lr": 5e-3, "weight_decay": 0.0, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, config=config,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    device = engine.device
    proxy = task_batches("source", 2 * world, seed=11)[rank::world]     # this rank's shard
    curv = estimate_curvature(engine, proxy, variant=args.variant, progress=False)
    reg = LaLoRARegularizer(curv, lam=args.lam, shard_factors=args.shard_factors).to(device)
    for step, batch in enumerate(task_batches("target", args.steps, seed=12)):
        local = {k: v[rank::world].to(device) for k, v in batch.items()}
        task = lm_loss(engine, local)
        penalty = reg(engine)                    # after the forward
        engine.backward(task + penalty)
        engine.step()
        full = reg.full_value(penalty)
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  task {float(task.detach()):.4f}  penalty {full:.4f}", flush=True)
    engine.eval()
    src, tgt = accuracy(engine, task_batches("source", 2, seed=13)), accuracy(engine, task_batches("target", 2, seed=14))
    factors = reg.penalty.memory_bytes() if reg.penalty is not None else 0
    print(f"rank {rank}: ZeRO-{args.stage}, factor bytes held {factors}, source acc {src:.3f}, target acc {tgt:.3f}",
          flush=True)


if __name__ == "__main__":
    main()
