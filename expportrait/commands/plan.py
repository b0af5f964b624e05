"""`expportrait plan --recipe NAME --clips N`: the capacity plan of a recipe for N clips (CPU and
GPU hours per stage, shard and latent bytes, the cluster that preprocesses in a day and trains
in a week), from the benchmarks' measured costs and the generator's analytic FLOPs; every
assumption printed (expportrait/plan.py)."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from preprocessing.errors import positive_float, positive_int
    p = sub.add_parser("plan", help="capacity plan: CPU/GPU hours, bytes and cluster shape for N clips")
    p.add_argument("--recipe", required=True, help="a recipe name (configs/recipes/NAME.yaml) or a recipe YAML")
    p.add_argument("--clips", required=True, type=positive_int, help="clips in the corpus")
    p.add_argument("--clip-seconds", type=positive_float, default=10.0, help="mean clip length (default 10 s)")
    p.add_argument("--gpus-per-node", type=positive_int, default=8)
    p.add_argument("--cpus-per-node", type=positive_int, default=96)
    p.add_argument("--gpu", default="h100", choices=["h100", "h200", "a100"], help="the training GPU")
    p.add_argument("--epochs", type=positive_float, default=1.0, help="passes over the samples (default 1)")
    p.add_argument("--preprocess-days", type=positive_float, default=1.0)
    p.add_argument("--train-days", type=positive_float, default=7.0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict:
    from expportrait.plan import PlanInputs, format_plan, make_plan
    inputs = PlanInputs(recipe=args.recipe, clips=args.clips, clip_seconds=args.clip_seconds,
                        gpus_per_node=args.gpus_per_node, cpus_per_node=args.cpus_per_node, gpu=args.gpu,
                        epochs=args.epochs, preprocess_days=args.preprocess_days, train_days=args.train_days)
    plan = make_plan(inputs)
    for line in format_plan(plan, inputs):
        print(line)
    return plan
