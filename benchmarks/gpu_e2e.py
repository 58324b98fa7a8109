"""LaLoRA end to end at real Llama shapes: what a GPU user pays for the curvature and the penalty.

Per size (Llama-3.2-1B, Llama-3.2-3B, Llama-3.1-8B: bf16 weights, random init, built on the device
itself; LoRA r = 16 on all seven projections, B* drawn non-zero so that every factor is formed):

* capture: ``estimate_curvature`` on 2 proxy batches of 4 x 1024 tokens per variant, against plain
  forward+backward on the same batches and against the *floor*: that forward+backward plus the
  variant's factor updates alone (the same SYRKs on random rows, each distinct shape timed once and
  counted as often as it occurs), timed in the same run;
* penalty: ``reg(model)`` forward+backward with dense fp32, packed fp32, packed bf16 and low-rank
  (k = 256, bf16 U, one-pass sketch capture) factors,
  against one LoRA training step (AdamW, batch 8 x 1024, gradient checkpointing, no penalty);
* memory: factor MiB per storage, and the peak of each phase (``torch.cuda.max_memory_allocated``);
* curvlinops' ``KFACLinearOperator`` (empirical Fisher, expand) on the same LoRA weights and batches:
  time and peak.

Whatever does not fit is reported as such (the out-of-memory message), never dropped. Times are the
best of ``--repeats`` after one warm-up. ``--smoke`` runs a tiny model on any device (CI runs it on
the CPU); its numbers mean nothing. ``--budget`` seconds: sizes not started by then are reported as
not run.

Run: python benchmarks/gpu_e2e.py [--smoke] [--sizes 1b,3b,8b] [--out DIR] [--budget S]
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, table  # noqa: E402

import lalora_kernels  # noqa: E402
from lalora_kernels import LaLoRARegularizer, LowRank, estimate_curvature  # noqa: E402
from lalora_kernels.reference.packed_format import packed_numel  # noqa: E402

# hidden, MLP, heads, kv heads, layers, vocabulary (the models' own configs)
SIZES = {"1b": (2048, 8192, 32, 8, 16, 128256), "3b": (3072, 8192, 24, 8, 28, 128256),
         "8b": (4096, 14336, 32, 8, 32, 128256)}
SMOKE = {"smoke": (64, 128, 4, 2, 2, 128)}
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VARIANTS = ("diag", "kfac", "tri", "wkfac")
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def sync():
    if CUDA:
        torch.cuda.synchronize()


def best(fn, repeats: int) -> float:
    """Seconds: the best of ``repeats`` calls after one warm-up call."""
    fn()
    out = math.inf
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out = min(out, time.perf_counter() - t0)
    return out


def peak_of(fn) -> tuple[object, float]:
    """(fn(), peak GiB allocated while it ran; 0 on the CPU)."""
    if CUDA:
        sync()
        torch.cuda.reset_peak_memory_stats()
    out = fn()
    sync()
    return out, (torch.cuda.max_memory_allocated() / 2**30 if CUDA else 0.0)


def free():
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def build(shape, r: int):
    """The model, made on the device in bf16 (no CPU copy), with LoRA on all seven projections."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    h, inter, heads, kv, layers, vocab = shape
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                      tie_word_embeddings=False)
    default = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(torch.bfloat16)
        with torch.device(DEV):
            base = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(PROJ), lora_dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return model


def batches(n, bsz, seq, vocab):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (bsz, seq), generator=g).to(DEV)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def fwd_bwd(model, data):
    for b in data:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        F.cross_entropy(logits.flatten(0, 1).float(), b["labels"][:, 1:].flatten(), reduction="sum").backward()
    model.zero_grad(set_to_none=True)


def factor_floor(curv, tokens: int, repeats: int) -> float:
    """Seconds of the variant's factor updates alone on random bf16 rows: every stored Sx/Sg (or, for
    diag, FA/FB) once per proxy pass, each distinct shape timed once."""
    ops = torch.ops.lalora
    shapes: dict[tuple, int] = {}
    for key, t in curv.tensors.items():
        kind, name = key.split("/", 1)
        if kind in ("Sx", "Sg"):
            shape = ("cov", curv.dim(key))
        elif kind in ("FA", "FB"):
            shape = ("sq", *t.shape)
        else:
            continue
        shapes[shape] = shapes.get(shape, 0) + 1
    total = 0.0
    for shape, count in shapes.items():
        if shape[0] == "cov":
            n = shape[1]
            X = torch.randn(tokens, n, device=DEV, dtype=torch.bfloat16)
            if curv.layout == "packed":
                acc = torch.zeros(packed_numel(n, curv.tile), device=DEV)
                fn = lambda: ops.packed_cov_update_(acc, X, None, 1.0, curv.tile)  # noqa: E731
            else:
                acc = torch.zeros(n, n, device=DEV)
                fn = lambda: ops.cov_update_(acc, X, None, 1.0)  # noqa: E731
        else:
            p, q = shape[1:]
            G, X = (torch.randn(tokens, d, device=DEV, dtype=torch.bfloat16) for d in (p, q))
            acc = torch.zeros(p, q, device=DEV)
            fn = lambda: ops.sqcov_update_(acc, G, X, None, 1.0)  # noqa: E731
        total += count * best(fn, repeats)
        del acc
    free()
    return total


def oom(exc) -> str:
    return f"does not fit: {str(exc).splitlines()[0][:160]}"


def capture_rows(model, proxy, tokens, t_fb, repeats) -> list[dict]:
    rows = []
    for variant in VARIANTS:
        row = {"phase": "capture", "variant": variant}
        try:
            est = lambda: estimate_curvature(model, proxy, variant=variant, progress=False)  # noqa: E731
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t = best(est, repeats)
                curv, peak = peak_of(est)
            floor = t_fb + factor_floor(curv, tokens, repeats)
            row.update(seconds=round(t, 4), vs_fwd_bwd=round(t / t_fb, 3), floor_s=round(floor, 4),
                       vs_floor=round(t / floor, 3), factor_MiB=round(curv.memory_bytes() / 2**20, 2),
                       layout=curv.layout, peak_GiB=round(peak, 2))
            del curv
        except torch.cuda.OutOfMemoryError as exc:
            row["status"] = oom(exc)
        free()
        rows.append(row)
    return rows


def penalty_rows(model, proxy, train, repeats) -> list[dict]:
    """Penalty fwd+bwd per factor storage, and the training step it is compared with."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def step():
        fwd_bwd(model, train)
        opt.step()
    try:
        model.train()
        t_step, step_peak = best(step, repeats), peak_of(step)[1]
        model.eval()
        rows = [{"phase": "train step", "variant": "-", "seconds": round(t_step, 4), "peak_GiB": round(step_peak, 2)}]
    except torch.cuda.OutOfMemoryError as exc:
        return [{"phase": "train step", "variant": "-", "status": oom(exc)}]
    finally:
        opt.zero_grad(set_to_none=True)
        model.gradient_checkpointing_disable()
    lowrank = LowRank(rank=256 if CUDA else 8, capture="sketch")     # smoke: the tiny model's factors are small
    storages = (("packed", torch.bfloat16), ("packed", torch.float32), ("dense", torch.float32),
                (lowrank, torch.bfloat16))
    for storage, dtype in storages:
        label = storage if isinstance(storage, str) else f"lowrank k={storage.rank}"
        row = {"phase": "penalty", "variant": "kfac", "storage": f"{label} {str(dtype)[6:]}"}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                curv = estimate_curvature(model, proxy, variant="kfac", progress=False, storage=storage)
            curv.to(dtype=dtype)
            reg = LaLoRARegularizer(curv, lam=1.0).to(DEV)
            t = best(lambda: reg(model).backward(), repeats)
            peak = peak_of(lambda: reg(model).backward())[1]
            model.zero_grad(set_to_none=True)
            row.update(seconds=round(t, 6), vs_step=round(t / t_step, 5),
                       factor_MiB=round(curv.memory_bytes() / 2**20, 2), peak_GiB=round(peak, 2))
            del reg, curv
        except torch.cuda.OutOfMemoryError as exc:
            row["status"] = oom(exc)
        model.zero_grad(set_to_none=True)
        free()
        rows.append(row)
    return rows


def curvlinops_row(model, proxy, t_fb, repeats) -> dict:
    row = {"phase": "capture", "variant": "curvlinops KFAC"}
    try:
        from curvlinops import KFACLinearOperator
    except ImportError:
        return {**row, "status": "curvlinops not installed (benchmarks/gpu_e2e.sh installs it from .whl)"}
    from lalora_kernels.apps.bench import FlatLogits
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    data = [(b["input_ids"], b["labels"][:, 1:].flatten()) for b in proxy]
    loss = torch.nn.CrossEntropyLoss(reduction="sum", ignore_index=-100)
    held = []

    def build_op():
        held.clear()
        op = KFACLinearOperator(FlatLogits(model), loss, params, data, fisher_type="empirical",
                                kfac_approx="expand", check_deterministic=False, progressbar=False)
        op.compute_kronecker_factors()
        held.append(op)
    try:
        t = best(build_op, repeats)
        held.clear()
        free()
        peak = peak_of(build_op)[1]
        op = held[0]
        nbytes = sum(v.numel() * v.element_size() for store in (op._input_covariances, op._gradient_covariances)
                     for v in store.values())
        row.update(seconds=round(t, 4), vs_fwd_bwd=round(t / t_fb, 3), factor_MiB=round(nbytes / 2**20, 2),
                   peak_GiB=round(peak, 2))
    except torch.cuda.OutOfMemoryError as exc:
        row["status"] = oom(exc)
    held.clear()
    free()
    return row


def measure(name, shape, args) -> list[dict]:
    proxy_bsz, seq, train_bsz = (2, 16, 2) if args.smoke else (4, 1024, 8)
    try:
        model = build(shape, args.rank).eval()
    except torch.cuda.OutOfMemoryError as exc:
        return [{"size": name, "phase": "build", "status": oom(exc)}]
    proxy = batches(2, proxy_bsz, seq, shape[-1])
    train = batches(1, train_bsz, seq, shape[-1])
    tokens = 2 * proxy_bsz * seq
    t_fb = best(lambda: fwd_bwd(model, proxy), args.repeats)
    rows = [{"phase": "fwd+bwd", "variant": "-", "seconds": round(t_fb, 4)}]
    rows += capture_rows(model, proxy, tokens, t_fb, args.repeats)
    rows += penalty_rows(model, proxy, train, args.repeats)
    if not args.no_peers:
        rows.append(curvlinops_row(model, proxy, t_fb, args.repeats))
    del model
    free()
    return [{"size": name, **r} for r in rows]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny model, any device (CI)")
    ap.add_argument("--sizes", default="1b,3b,8b")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--budget", type=float, default=float("inf"), help="seconds; later sizes are not started")
    ap.add_argument("--no-peers", action="store_true", help="leave out curvlinops")
    ap.add_argument("--out", default="benchmarks/results/gpu_e2e")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)      # transformers' renames, not ours
    sizes = SMOKE if args.smoke else {k: SIZES[k] for k in args.sizes.split(",")}
    if args.smoke:
        args.repeats = 1
    start, rows = time.perf_counter(), []
    for name, shape in sizes.items():
        if time.perf_counter() - start > args.budget:
            rows.append({"size": name, "phase": "-", "status": f"not run: past the {args.budget:.0f} s budget"})
            continue
        rows += measure(name, shape, args)
        print(f"{name}: done at {time.perf_counter() - start:.0f} s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": {**machine(), "device": torch.cuda.get_device_name() if CUDA else "cpu"},
              "backends": lalora_kernels.backends(), "rank": args.rank, "rows": rows}
    (out / ("gpu_e2e_smoke.json" if args.smoke else "gpu_e2e.json")).write_text(json.dumps(result, indent=2) + "\n")
    cols = ["size", "phase", "variant", "storage", "seconds", "vs_fwd_bwd", "vs_floor", "vs_step", "factor_MiB",
            "peak_GiB", "status"]
    print(table([{c: r.get(c, "") for c in cols} for r in rows], cols))


if __name__ == "__main__":
    main()
