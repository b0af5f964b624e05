"""`expportrait recipe NAME --out DIR`: a recipe's parts as the plain config files the launchers take.

A recipe (configs/recipes/NAME.yaml) names existing configs and the few values it changes in
them. Launchers that are not Python (``ray job submit``, ``sbatch``, ``torchrun``, a shell)
need files, so this writes the resolved ones, each the single source the command reads:

- ``DIR/preprocess.yaml``: ``python -m pipelines.preprocess --config DIR/preprocess.yaml
  --input ... --output ...`` (the recipe's stage settings applied and validated);
- ``DIR/transfer.yaml`` and ``DIR/generator.yaml``: ``python -m training.train fit --config
  DIR/generator.yaml ...`` (the recipe's overrides applied, the run tagged ``recipe: NAME`` so
  that ``register`` takes its inference settings from the recipe);
- ``DIR/codec.json``: the codec kind and the window ``training.tasks.generator codec`` takes.

Prints one JSON line naming the files. The recipe's head model: ``synthetic`` is left to the
default resolver (the synthetic model of seed 0), a path is written into the configs.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recipe", help="write a recipe's resolved preprocessing and training configs")
    p.add_argument("name", help="a recipe name (configs/recipes/NAME.yaml) or a recipe YAML")
    p.add_argument("--out", required=True, type=Path, help="folder for preprocess.yaml, transfer.yaml, "
                                                            "generator.yaml, codec.json")
    p.set_defaults(func=run)


def write_recipe_configs(name: str, out: Path) -> dict:
    """Write the resolved configs of recipe ``name`` into ``out``; their paths."""
    import yaml

    from expportrait.recipes import load_recipe
    recipe = load_recipe(name)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    pre = recipe.preprocess_config().model_dump(mode="json")
    pre.pop("input", None)                      # given on the command line (the job refuses none)
    files["preprocess"] = out / "preprocess.yaml"
    files["preprocess"].write_text(yaml.safe_dump(pre, sort_keys=False))
    for part in ("transfer", "generator"):
        data = recipe.train_config(part)
        logger = data.setdefault("trainer", {}).setdefault("logger", {})
        logger.setdefault("init_args", {}).setdefault("tags", {})["recipe"] = recipe.name
        files[part] = out / f"{part}.yaml"
        files[part].write_text(yaml.safe_dump(data, sort_keys=False))
    g = recipe.generator_init()
    files["codec"] = out / "codec.json"
    files["codec"].write_text(json.dumps({"kind": recipe.codec.kind, "frames": g["frames"],
                                          "frame_stride": g["frame_stride"], "size": recipe.training_size()}))
    return {"recipe": recipe.name, **{k: str(v) for k, v in files.items()}}


def run(args: argparse.Namespace) -> dict:
    return write_recipe_configs(args.name, args.out)
