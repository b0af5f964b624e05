"""Named recipes (``configs/recipes/<name>.yaml``): the preprocessing config, the two training
configs and the inference settings of one model size, loaded strictly and checked to agree.

A recipe references the existing configs and holds only what it changes in them (one home per
value)::

    name: tiny_cpu
    head_model: synthetic              # synthetic (seed 0) | an SMPL-X-format .npz
    preprocess: {config: configs/preprocess/local.yaml, stages: {crop_size: 128, ...}}
    transfer:   {config: configs/train/transfer_tiny.yaml, args: {}}
    codec:      {kind: space_to_depth}  # the codec to train (null: the generator config's folder)
    generator:  {config: configs/train/dit_tiny_cpu.yaml, args: {model.init_args.flavor: tiny_z48}}
    inference:  {overlap: 2, seed: 0}

``args`` are LightningCLI overrides (dotted keys, as on the command line). The inference
settings are derived (:meth:`Recipe.inference_settings`): window, stride, size, sampler steps,
shift and guidance are the generator's; fps is the preprocessing's; only ``overlap`` and
``seed`` are inference's own. The agreement rules (:meth:`Recipe.check`), each a
:class:`RecipeError` naming the values:

- the preprocessing's segments hold a training window: ``segment_frames`` >=
  ``(frames - 1) * frame_stride + 1``, and ``min_frames`` >= that span (shorter clips would
  become samples the reader drops);
- the training size is the crop size (``size: null``) or a divisor of it (the crops are
  downsampled, as the tiny recipe trains at 32² on 128² crops), a multiple of 16;
- the window is 4k+1 and the inference overlap fits in it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from expportrait.reenactment import InferenceSettings

REPO = Path(__file__).resolve().parents[1]
RECIPES_DIR = REPO / "configs" / "recipes"
_STRICT = ConfigDict(extra="forbid", strict=True)


class RecipeError(ValueError):
    """A recipe that cannot be used: unknown, malformed, or its parts disagree."""


class PreprocessPart(BaseModel):
    model_config = _STRICT
    config: str                                    # a configs/preprocess/*.yaml, repo-relative or absolute
    stages: dict[str, Any] = Field(default_factory=dict)   # overrides of its `stages` (fit: merged)


class TrainPart(BaseModel):
    model_config = _STRICT
    config: str                                    # a LightningCLI YAML under configs/train/
    args: dict[str, Any] = Field(default_factory=dict)     # LightningCLI overrides, dotted keys


class CodecPart(BaseModel):
    model_config = _STRICT
    kind: Literal["space_to_depth", "wan_vae"] | None = None   # trained by `training.tasks.generator codec`


class InferencePart(BaseModel):
    model_config = _STRICT
    overlap: int = Field(ge=0)                     # driven frames shared by consecutive windows
    seed: int = 0


class Recipe(BaseModel):
    model_config = _STRICT
    name: str
    head_model: str                                # "synthetic" or an SMPL-X-format .npz path
    preprocess: PreprocessPart
    transfer: TrainPart
    codec: CodecPart = Field(default_factory=CodecPart)
    generator: TrainPart
    inference: InferencePart

    # -- resolved parts ------------------------------------------------------------------------
    def preprocess_config(self, overrides: dict | None = None):
        """The validated :class:`~pipelines.preprocess.config.PreprocessConfig` (its YAML, the
        recipe's stage overrides, then ``overrides`` of top-level keys)."""
        from pipelines.preprocess.config import ConfigError, read_yaml, validate_config
        data = read_yaml(_path(self.preprocess.config)) or {}
        stages = dict(data.get("stages") or {})
        fit = {**(stages.get("fit") or {}), **(self.preprocess.stages.get("fit") or {})}
        stages.update({k: v for k, v in self.preprocess.stages.items() if k != "fit"})
        stages["fit"] = fit
        data = {**data, "stages": stages, **(overrides or {})}
        try:
            return validate_config(data, f"recipe {self.name}: preprocess")
        except ConfigError as exc:
            raise RecipeError(str(exc)) from None

    def train_config(self, part: str) -> dict:
        """The LightningCLI config of ``part`` (``transfer`` | ``generator``) with the recipe's args applied."""
        import yaml
        spec: TrainPart = getattr(self, part)
        data = yaml.safe_load(_path(spec.config).read_text()) or {}
        for key, value in spec.args.items():
            node = data
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        return data

    def train_args(self, part: str) -> list[str]:
        """``--config CONFIG``, the recipe's overrides as LightningCLI arguments, and the run's
        MLflow tag ``recipe`` (``register`` takes the inference settings from it)."""
        import json
        spec: TrainPart = getattr(self, part)
        out = ["--config", str(_path(spec.config))]
        for key, value in spec.args.items():
            out += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
        return out + ["--trainer.logger.init_args.tags", json.dumps({"recipe": self.name})]

    def generator_init(self) -> dict:
        """``model.init_args`` of the generator, the task's class defaults filled in."""
        import inspect

        from training.tasks.generator import GeneratorTask
        defaults = {k: p.default for k, p in inspect.signature(GeneratorTask.__init__).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        return {**defaults, **(self.train_config("generator").get("model", {}).get("init_args") or {})}

    def window_span(self) -> int:
        g = self.generator_init()
        return (int(g["frames"]) - 1) * int(g["frame_stride"]) + 1

    def training_size(self) -> int:
        """The generator's frame size: its ``size``, else the crop size."""
        size = self.generator_init()["size"]
        return int(size) if size is not None else int(self.preprocess_config().stages.crop_size)

    def inference_settings(self) -> InferenceSettings:
        """The inference settings this recipe trains for (module doc)."""
        g = self.generator_init()
        shift = g["sample_shift"] if g["sample_shift"] is not None else g["shift"]
        settings = InferenceSettings(size=self.training_size(), window=int(g["frames"]),
                                     overlap=self.inference.overlap, frame_stride=int(g["frame_stride"]),
                                     steps=int(g["sample_steps"]), guidance=float(g["guidance"]),
                                     shift=float(shift), seed=self.inference.seed,
                                     fps=float(self.preprocess_config().stages.fps or InferenceSettings.fps))
        return settings

    def needs_latents(self) -> bool:
        return bool(self.sidecar_folders()["latents"])

    def generator_fields(self) -> list[str]:
        """The shard members the generator's training decodes (``[]``: none, sidecars only)."""
        fields = (self.train_config("generator").get("data", {}).get("init_args") or {}).get("fields")
        return list(fields) if fields is not None else ["frames", "normals"]

    def sidecar_folders(self) -> dict[str, str | None]:
        """The generator config's precomputed sidecar folders: ``latents``, ``normals`` (None: not used)."""
        data = self.train_config("generator").get("data", {}).get("init_args") or {}
        return {kind: data.get(kind) or None for kind in ("latents", "normals")}

    # -- agreement ------------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Every disagreement between the parts (empty: they agree), each naming the values."""
        stages = self.preprocess_config().stages
        g = self.generator_init()
        span, out = self.window_span(), []
        where = f"{self.generator.config} (frames {g['frames']}, frame_stride {g['frame_stride']})"
        if stages.segment_frames < span:
            out.append(f"preprocess segment_frames {stages.segment_frames} < the training window's span {span} "
                       f"of {where}")
        if stages.min_frames < span:
            out.append(f"preprocess min_frames {stages.min_frames} < the training window's span {span} of {where}: "
                       f"shorter clips would become samples the reader drops")
        if stages.fps is None:
            out.append("preprocess fps is null (each source's own rate): training and inference need one rate")
        size = g["size"]
        if size is not None and (int(size) > stages.crop_size or stages.crop_size % int(size)):
            out.append(f"generator size {size} is not the crop size {stages.crop_size} or a divisor of it")
        try:
            self.inference_settings().check()
        except ValueError as exc:
            out.append(f"inference settings: {exc}")
        return out

    def check(self) -> "Recipe":
        found = self.problems()
        if found:
            raise RecipeError(f"recipe {self.name}: its parts disagree: " + "; ".join(found))
        return self


def _path(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else REPO / p


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(name: str | os.PathLike, check: bool = True) -> Recipe:
    """The recipe ``name`` (``configs/recipes/<name>.yaml``) or a recipe YAML path, validated
    strictly and (``check``) its agreement rules checked; :class:`RecipeError` otherwise."""
    import yaml
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = RECIPES_DIR / f"{name}.yaml"
        if not path.is_file():
            raise RecipeError(f"unknown recipe {str(name)!r}; known: {recipe_names()}")
    if not path.is_file():
        raise RecipeError(f"recipe file {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path}: YAML error: {exc}") from None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'recipe'}: {e['msg']}" for e in exc.errors())
        raise RecipeError(f"recipe {path}: {problems}") from None
    for part in (recipe.preprocess, recipe.transfer, recipe.generator):
        if not _path(part.config).is_file():
            raise RecipeError(f"recipe {recipe.name}: config {part.config} not found")
    return recipe.check() if check else recipe


__all__ = ["Recipe", "RecipeError", "load_recipe", "recipe_names"]
