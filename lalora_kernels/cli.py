"""The ``lalora`` command line."""
from __future__ import annotations

import argparse
import json
import warnings


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="lalora", description="LaLoRA kernels: curvature and penalty")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="end-to-end run on an embedded tiny Llama (no downloads)")
    demo.add_argument("--variant", default="kfac", choices=["diag", "kfac", "tri", "wkfac"])
    demo.add_argument("--lam", type=float, default=0.1, help="LaLoRA strength (mean_diag normalised)")
    demo.add_argument("--steps", type=int, default=150, help="fine-tuning steps on the target task")
    demo.add_argument("--init", default="pissa", choices=["zero", "pissa", "olora"],
                      help="LoRA init; 'zero' is peft's default (B = 0, see SPEC section 5)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", help="also write the results to this JSON file")
    demo.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    # peft reads a property that transformers 5 deprecated; it is not ours to fix and not news to a user
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    if args.command == "demo":
        from .demo import run
        out = run(variant=args.variant, lam=args.lam, steps=args.steps, init=args.init, seed=args.seed,
                  progress=not args.no_progress)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
