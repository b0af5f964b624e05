"""`expportrait preprocess --recipe NAME`: the preprocessing job with a recipe's preprocessing
config (its ``configs/preprocess/*.yaml`` and the recipe's stage overrides: crop size, segment
and minimum frames), so the shards fit the recipe's training (what ``expportrait preflight``
checks). Same job, options and exit codes as ``python -m pipelines.preprocess``; the cluster's
RayJob runs it (``infra/ray/rayjob-preprocess.yaml``)::

    expportrait preprocess --recipe wan1.3b [--input MANIFEST] [--output URL] [--head-model NPZ]
        [--address RAY] [--dry-run]
"""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preprocess", help="the preprocessing job with a recipe's preprocessing config")
    p.add_argument("--recipe", required=True, help="a recipe name (configs/recipes/NAME.yaml) or a recipe YAML")
    p.add_argument("--input", help="folder of videos or manifest (default: the recipe's preprocessing config's)")
    p.add_argument("--output", help="output folder or URL (default: the recipe's preprocessing config's)")
    p.add_argument("--head-model", help="SMPL-X-format .npz (default: the recipe's preprocessing config's)")
    p.add_argument("--limit", type=int, help="only the first N clips (sorted by clip id)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else embedded)")
    p.add_argument("--dry-run", action="store_true", help="check the config and inputs; print the plan")
    p.add_argument("--retry-failed", action="store_true", help="also redo done shards with failed clips")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict:
    from pipelines.job_io import JobInputError
    from pipelines.preprocess.cli import run_config
    from pipelines.preprocess.job import EnvironmentFault
    from preprocessing.errors import EnvironmentFault as Fault, UserError

    from expportrait.recipes import load_recipe
    recipe = load_recipe(args.recipe)
    given = {"input": args.input, "output": args.output, "head_model": args.head_model, "limit": args.limit}
    overrides = {k: v for k, v in given.items() if v is not None}
    cfg = recipe.preprocess_config(overrides)
    if cfg.input is None:
        raise UserError(f"recipe {recipe.name}: its preprocessing config names no input; pass --input")
    try:
        return {"recipe": recipe.name, **run_config(cfg, args)}
    except EnvironmentFault as exc:            # the job's faults, as the shared wrapper's codes (3, 2)
        raise Fault(str(exc)) from exc
    except JobInputError as exc:
        raise UserError(str(exc)) from exc
