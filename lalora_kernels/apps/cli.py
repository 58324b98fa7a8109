"""The ``lalora`` command line."""
from __future__ import annotations

import argparse
import warnings


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="lalora", description="LaLoRA kernels: curvature and penalty")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="learning vs forgetting: LoRA, L2 and LaLoRA variants, end to end")
    demo.add_argument("--quick", action="store_true", help="fewer steps and lams (about 2 minutes on 2 CPU cores)")
    demo.add_argument("--steps", type=_positive, help="fine-tuning steps (default 100, --quick 50)")
    demo.add_argument("--lams", type=float, nargs="+", help="lam (and L2 delta) sweep")
    demo.add_argument("--inits", nargs="+", default=["zero", "pissa"], choices=["zero", "pissa", "olora"],
                      help="LoRA inits to compare: zero (peft default, B = 0), pissa, olora")
    demo.add_argument("--variants", nargs="+", default=["diag", "kfac", "tri", "wkfac"],
                      choices=["diag", "kfac", "tri", "wkfac"])
    demo.add_argument("--lr", type=float, default=5e-3)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="lalora_demo_out", help="folder for results.json/.md and pareto.png")
    demo.add_argument("--model", help="local HF causal-LM folder to use instead of the embedded default")
    demo.add_argument("--source", help="with --model: jsonl of source text ({'text': ...} per line)")
    demo.add_argument("--target", help="with --model: jsonl of target text")
    demo.add_argument("--targets", nargs="+", help="with --model: LoRA target_modules (default: all "
                      "seven Llama projections)")
    demo.add_argument("--no-progress", action="store_true")
    bench = sub.add_parser("bench", help="curvature and penalty cost against model size")
    bench.add_argument("--sizes", nargs="+", default=None, help="tiny small base medium large (default) or "
                       "llama-3.2-1b llama-3.2-3b llama-3.1-8b (real layer shapes; see --layers)")
    bench.add_argument("--layers", type=_positive, help="run a slice of this many layers (cost is per layer)")
    bench.add_argument("--variant", default="kfac", choices=["diag", "kfac", "tri", "wkfac"])
    bench.add_argument("--repeats", type=_positive, default=3)
    bench.add_argument("--no-peers", action="store_true", help="skip curvlinops even when installed")
    bench.add_argument("--lowrank", type=_positive, help="add a row with low-rank factors of this rank (sketch capture)")
    bench.add_argument("--out", default="lalora_bench_out")
    bench.add_argument("--no-progress", action="store_true")
    exp = sub.add_parser("experiment", help="LaLoRA against the anti-forgetting methods peft users can pick, "
                         "on Python's documentation (about 70 minutes on 2 CPU cores; --quick: about 2)")
    exp.add_argument("--quick", action="store_true", help="a few runs of every method and sweep (a smoke test)")
    exp.add_argument("--budget-minutes", type=float, default=85.0,
                     help="runs left when this is spent are recorded as skipped")
    exp.add_argument("--out", default="lalora_experiment_out")
    exp.add_argument("--resume", action="store_true",
                     help="keep the finished runs of --out's results.json and run only the others")
    exp.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    # peft reads a property that transformers 5 deprecated; it is not ours to fix and not news to a user
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    if args.command == "bench":
        from .bench import DEFAULT_SIZES, run as bench_run
        bench_run(sizes=args.sizes or DEFAULT_SIZES, layers=args.layers, variant=args.variant, out=args.out,
                  repeats=args.repeats, peers=not args.no_peers, progress=not args.no_progress, lowrank=args.lowrank)
    if args.command == "experiment":
        from .experiment.suite import run as experiment_run
        experiment_run(out=args.out, quick=args.quick, budget_minutes=args.budget_minutes,
                       progress=not args.no_progress, resume=args.resume)
    if args.command == "demo":
        from .demo import run
        setup = None
        if args.model or args.source or args.target:
            if not (args.model and args.source and args.target):
                parser.error("--model, --source and --target go together")
            from .demo_files import file_setup
            setup = file_setup(args.model, args.source, args.target, steps=args.steps or 100,
                               targets=args.targets)
        run(out=args.out, quick=args.quick, steps=args.steps, lams=args.lams, inits=tuple(args.inits),
            variants=tuple(args.variants), seed=args.seed, progress=not args.no_progress, setup=setup,
            lr=args.lr)


if __name__ == "__main__":
    main()
