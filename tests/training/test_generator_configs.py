"""The generator's cluster configs parse through the training CLI and build on the meta device
to the published sizes (no weights, no GPU); the launch files name entry points that exist."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "train"


def _print_config(config: Path, capsys) -> dict:
    from training.train import build_cli
    with pytest.raises(SystemExit):
        build_cli(["fit", "--config", str(config), "--print_config"])
    out = capsys.readouterr().out          # DeepSpeed's import may log a line to stdout first
    return yaml.safe_load("\n".join(line for line in out.splitlines() if not re.match(r"\[\d{4}-", line)))


def _meta_task(init_args: dict):
    """The config's task on the meta device, without its local folders (weights, codec, transfer)."""
    from training.tasks.generator import GeneratorTask
    args = {**init_args, "wan_folder": None, "pretrained": None, "codec": None, "transfer_module": None}
    with torch.device("meta"):
        task = GeneratorTask(**args)
        task.configure_model()             # the model is built here (Lightning calls it in fit), on meta
        return task


def _lora_params(layers: int, dim: int, ffn: int, rank: int) -> int:
    """peft LoRA on q, k, v, o of both attentions (dim -> dim) and the FFN's two linears."""
    return layers * rank * (8 * 2 * dim + 2 * (dim + ffn))


@pytest.mark.parametrize("name,stage,flavor,total,trainable", [
    ("dit_wan1.3b_zero2.yaml", 2, "wan1.3b", 1.42e9, None),
    ("dit_wan14b_lora_zero2.yaml", 2, "wan14b_lora", 1.43e10, _lora_params(40, 5120, 13824, 128)),
])
def test_cluster_configs_parse_and_build_on_meta(name, stage, flavor, total, trainable, capsys):
    cfg = _print_config(CONFIGS / name, capsys)
    trainer, init = cfg["trainer"], cfg["model"]["init_args"]
    assert trainer["precision"] == "bf16-mixed" and trainer["accelerator"] == "gpu"
    assert trainer["strategy"]["class_path"] == "training.strategies.DeepSpeedStrategy"   # stock + fp32 geometry
    assert trainer["strategy"]["init_args"]["stage"] == stage
    assert init["flavor"] == flavor and init["gradient_checkpointing"] is True and init["dtype"] == "bfloat16"
    assert init["transfer_module"] and init["codec_subfolder"] == "vae"           # the paper's driving normals
    task = _meta_task(init)
    model = task.model
    assert model.transformer.is_gradient_checkpointing
    base = sum(p.numel() for name_, p in model.transformer.named_parameters() if "lora_" not in name_)
    assert abs(base - total) / total < 0.05, base
    if trainable is None:                                                         # full fine-tune
        assert sum(p.numel() for p in model.trainable_parameters()) == sum(p.numel() for p in model.parameters())
    else:                                                                         # LoRA: adapters + encoders
        lora = sum(p.numel() for name_, p in model.transformer.named_parameters() if "lora_" in name_)
        assert lora == trainable
        frozen = {name_ for name_, p in model.transformer.named_parameters() if not p.requires_grad}
        assert all("lora_" not in f for f in frozen) and "blocks.0.attn1.to_q.base_layer.weight" in frozen
        assert not any(isinstance(cb, dict) and "EMA" in cb.get("class_path", "") for cb in trainer["callbacks"])


def test_tiny_config_parses(tmp_path, capsys):
    from training.train import build_cli
    with pytest.raises(SystemExit):
        build_cli(["fit", "--config", str(CONFIGS / "dit_tiny_cpu.yaml"), "--out", str(tmp_path / "o"),
                   "--print_config"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["init_args"]["flavor"] == "tiny_z16"
    assert cfg["out"] == str(tmp_path / "o")
    assert (cfg["model"]["init_args"]["frames"] - 1) % 4 == 0


def test_launch_files_name_existing_entry_points():
    """infra/slurm and infra/torchrun run `-m training.train` with configs that exist."""
    import importlib.util
    for path in (REPO / "infra" / "slurm" / "train.sbatch", REPO / "infra" / "torchrun" / "train.sh"):
        text = path.read_text()
        modules = set(re.findall(r"-m ([a-z_.]+)", text))
        assert "training.train" in modules, path
        for module in modules - {"torch.distributed.run"}:
            assert importlib.util.find_spec(module) is not None, (path, module)
        for config in re.findall(r"configs/train/[\w./-]+\.yaml", text):
            assert (REPO / config).is_file(), (path, config)


@pytest.mark.parametrize("name,recipe", [("dit_wan1.3b_zero2.yaml", "wan1.3b"),
                                         ("dit_wan14b_lora_zero2.yaml", "wan14b_lora")])
def test_cluster_configs_train_from_what_the_precompute_jobs_write(name, recipe):
    """At scale a step reads only precomputed tensors: no shard member decoded in training; the
    shards, latents and driving normals where the RayJobs put them (they run the wan1.3b recipe;
    wan14b_lora's folders are the same under its name); the preprocessing job runs the recipe."""
    import shlex

    def argv(manifest: str) -> list[str]:
        return shlex.split(yaml.safe_load((REPO / "infra" / "ray" / manifest).read_text())["spec"]["entrypoint"])

    def flag(args: list[str], name_: str) -> str:
        return args[args.index(name_) + 1].replace("wan1.3b", recipe)

    data = yaml.safe_load((CONFIGS / name).read_text())["data"]["init_args"]
    pre, lat, nrm = (argv(f"rayjob-{job}.yaml") for job in ("preprocess", "encode-latents", "render-normals"))
    assert data["fields"] == []
    assert pre[2:4] == ["expportrait.cli", "preprocess"] and flag(pre, "--recipe") == recipe
    assert data["root"] == flag(pre, "--output") == flag(lat, "--input") == flag(nrm, "--input")
    assert data["latents"] == flag(lat, "--output") and data["normals"] == flag(nrm, "--output")
