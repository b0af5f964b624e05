"""Recipes: the three named ones load and agree, class defaults equal the tiny_cpu recipe's
values, and a recipe whose parts disagree is refused with the values named."""
from __future__ import annotations

import inspect
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from expportrait.recipes import RecipeError, load_recipe, recipe_names

REPO = Path(__file__).resolve().parents[2]


def test_the_named_recipes_load_and_agree():
    assert {"tiny_cpu", "wan1.3b", "wan14b_lora"} <= set(recipe_names())
    for name, span, size in (("tiny_cpu", 17, 32), ("wan1.3b", 33, 512), ("wan14b_lora", 81, 480)):
        recipe = load_recipe(name)
        stages = recipe.preprocess_config().stages
        assert recipe.window_span() == span and recipe.training_size() == size
        assert stages.segment_frames >= span and stages.min_frames >= span
        st = recipe.inference_settings()
        assert (st.window - 1) * st.frame_stride + 1 == span and st.size == size and st.fps == stages.fps
    # the GPU recipes train at their crop size
    assert load_recipe("wan1.3b").preprocess_config().stages.crop_size == 512


def test_class_defaults_equal_the_tiny_cpu_yaml():
    """GeneratorTask's defaults = every model.init_args value dit_tiny_cpu.yaml sets, and
    InferenceSettings' defaults = the tiny_cpu recipe's inference settings."""
    from expportrait.reenactment import InferenceSettings
    from training.tasks.generator import GeneratorTask
    config = yaml.safe_load((REPO / "configs/train/dit_tiny_cpu.yaml").read_text())["model"]["init_args"]
    defaults = {k: p.default for k, p in inspect.signature(GeneratorTask.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    assert set(config) <= set(defaults)
    assert {k: defaults[k] for k in config} == config
    assert asdict(InferenceSettings()) == asdict(load_recipe("tiny_cpu").inference_settings())


def test_train_args_carry_the_recipe_overrides_and_tag():
    args = load_recipe("tiny_cpu").train_args("generator")
    assert args[:2] == ["--config", str(REPO / "configs/train/dit_tiny_cpu.yaml")]
    pairs = dict(zip(args[2::2], args[3::2]))
    assert pairs["--model.init_args.flavor"] == "tiny_z48" and pairs["--model.init_args.size"] == "32"
    assert pairs["--trainer.logger.init_args.tags"] == '{"recipe": "tiny_cpu"}'


def _write(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load((REPO / "configs/recipes/wan1.3b.yaml").read_text())
    for key, value in changes.items():
        part, leaf = key.split("__")
        data[part].setdefault("stages" if part == "preprocess" else "args", {})[leaf] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_disagreeing_recipe_names_the_values(tmp_path):
    with pytest.raises(RecipeError, match=r"segment_frames 24 < the training window's span 33"):
        load_recipe(_write(tmp_path, preprocess__segment_frames=24))
    with pytest.raises(RecipeError, match=r"min_frames 25 < the training window's span 33"):
        load_recipe(_write(tmp_path, preprocess__min_frames=25))
    with pytest.raises(RecipeError, match=r"generator size 384 is not the crop size 512"):
        load_recipe(_write(tmp_path, **{"generator__model.init_args.size": 384}))
    with pytest.raises(RecipeError, match=r"frame count 32 is not of the form 4k\+1"):
        load_recipe(_write(tmp_path, **{"generator__model.init_args.frames": 32}))


def test_unknown_keys_and_names_are_refused(tmp_path):
    with pytest.raises(RecipeError, match="unknown recipe 'nope'"):
        load_recipe("nope")
    data = yaml.safe_load((REPO / "configs/recipes/tiny_cpu.yaml").read_text())
    data["inference"]["steps"] = 8                     # one home: the generator's sample_steps
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError, match="inference.steps"):
        load_recipe(tmp_path / "x.yaml")
    data = yaml.safe_load((REPO / "configs/recipes/tiny_cpu.yaml").read_text())
    data["preprocess"]["stages"]["crop_sise"] = 64
    (tmp_path / "y.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError, match="crop_sise"):
        load_recipe(tmp_path / "y.yaml")


@pytest.mark.parametrize("name", ["tiny_cpu", "wan1.3b", "wan14b_lora"])
def test_recipe_command_writes_the_resolved_configs_launchers_take(tmp_path, name):
    """`expportrait recipe NAME --out DIR`: the preprocessing config is the recipe's (validated
    again as the job reads it), the training configs carry its overrides and its tag."""
    import json

    from expportrait.cli import main
    from pipelines.preprocess.config import validate_config
    assert main(["recipe", name, "--out", str(tmp_path)]) == 0
    recipe = load_recipe(name)
    pre = validate_config(yaml.safe_load((tmp_path / "preprocess.yaml").read_text()))
    assert pre == recipe.preprocess_config().model_copy(update={"input": None})
    for part in ("transfer", "generator"):
        written = yaml.safe_load((tmp_path / f"{part}.yaml").read_text())
        assert written["trainer"]["logger"]["init_args"]["tags"]["recipe"] == recipe.name
        written["trainer"]["logger"]["init_args"]["tags"].pop("recipe")
        expected = recipe.train_config(part)
        expected["trainer"]["logger"]["init_args"].setdefault("tags", {})
        assert written == expected
    codec = json.loads((tmp_path / "codec.json").read_text())
    assert codec["size"] == recipe.training_size() and codec["frames"] == recipe.generator_init()["frames"]
