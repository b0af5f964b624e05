"""Building the generator under DeepSpeed ZeRO-3 without ever holding it whole on a rank.

Lightning calls ``LightningModule.configure_model`` inside ``deepspeed.zero.Init`` when the
strategy runs stage 3: each parameter is partitioned over the ranks as soon as its layer's
``__init__`` returns, so a rank's host memory grows by its 1/world share plus one layer, not by
the model (the 14B in bf16: ≈ 29 GB a rank when built in ``__init__``).

Weights are then read by **rank 0 only**, tensor by tensor from the safetensors files (never a
whole state dict), and copied in one layer at a time under
``deepspeed.zero.GatheredParameters(..., modifier_rank=0)``: the layer is gathered, rank 0 writes
it, DeepSpeed re-partitions it to every rank on exit (DeepSpeed#5326's pattern).

Sources: ``pretrained`` (a ``NormalDrivenWan.save_pretrained`` folder without LoRA) and
``wan_folder`` (an official Wan2.1 Diffusers folder: T2V's patch embedding is widened to the
I2V input with zeros, its CLIP image path dropped when the flavor has none, the condition
encoders start fresh). LoRA is refused under ZeRO-3: a frozen base is all-gathered every step
there; LoRA runs under ZeRO-2 with the frozen base out of the optimizer and the checkpoints
(``configs/train/dit_wan14b_lora_zero2.yaml``).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from models.generator import NormalDrivenWan
from models.generator.flavors import GeneratorFlavor


def zero3_partitioning(module) -> bool:
    """Whether ``module`` is being set up by a DeepSpeed strategy at ZeRO stage 3."""
    trainer = getattr(module, "_trainer", None)
    return bool(getattr(getattr(trainer, "strategy", None), "zero_stage_3", False))


def safetensors_reader(folder: Path, prefix: str = "") -> dict[str, Callable[[], Tensor]]:
    """Lazy readers of every tensor of a diffusers weights folder (one file or an indexed set),
    by ``prefix + name``: nothing is read until a reader is called."""
    from safetensors import safe_open
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in folder.glob("*.safetensors")]
    if not files:
        raise FileNotFoundError(f"{folder}: no safetensors weights")
    readers: dict[str, Callable[[], Tensor]] = {}
    for name in files:
        path = str(folder / name)
        with safe_open(path, "pt") as f:
            keys = list(f.keys())
        for key in keys:
            readers[prefix + key] = lambda path=path, key=key: _read(path, key)
    return readers


def _read(path: str, key: str) -> Tensor:
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return f.get_tensor(key)


def weight_readers(pretrained: str | None, wan_folder: str | None) -> tuple[dict[str, Callable[[], Tensor]], bool]:
    """(readers by the model's parameter names, whether every parameter must be found): a
    ``pretrained`` folder holds all of them, a Wan folder only the transformer's."""
    if pretrained:
        folder = Path(pretrained)
        meta = json.loads((folder / "generator.json").read_text())
        if meta["flavor_config"].get("lora_rank", 0):
            raise ValueError(f"{folder} holds a LoRA generator: LoRA trains under ZeRO-2 (frozen base out of the "
                             "optimizer and the checkpoints), not ZeRO-3")
        return {**safetensors_reader(folder / "transformer", "transformer."),
                **safetensors_reader(folder / "conditioning", "conditioning.")}, True
    folder = Path(wan_folder)
    sub = folder / "transformer" if (folder / "transformer").is_dir() else folder
    return safetensors_reader(sub, "transformer."), False


def fit_to(value: Tensor, param: Tensor, name: str) -> Tensor:
    """``value`` shaped as ``param``; a narrower patch embedding (T2V, 16 input channels) is
    widened with zeros on the new channels (as ``models.generator.model.widen_patch_embedding``)."""
    if value.shape == param.shape:
        return value
    if name.endswith("patch_embedding.weight") and value.shape[0] == param.shape[0] \
            and value.shape[2:] == param.shape[2:] and value.shape[1] < param.shape[1]:
        wide = torch.zeros(param.shape, dtype=value.dtype)
        wide[:, : value.shape[1]] = value
        return wide
    raise ValueError(f"weight {name}: shape {tuple(value.shape)} in the folder, {tuple(param.shape)} in the model")


def load_gathered(model: nn.Module, readers: dict[str, Callable[[], Tensor]], require_all: bool,
                  prefix: str = "") -> int:
    """Copy the weights into a ZeRO-3 partitioned ``model`` one module at a time (rank 0 reads
    and writes, every rank takes part in the gather); returns the tensors loaded. Without
    ``require_all`` parameters the readers lack keep their initialisation."""
    import deepspeed
    import torch.distributed as dist
    writer = not dist.is_initialized() or dist.get_rank() == 0
    loaded, missing = 0, []
    for module_name, module in model.named_modules(prefix=prefix.rstrip(".")):
        params = dict(module.named_parameters(recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
            for name, param in params.items():
                full = f"{module_name}.{name}" if module_name else name
                reader = readers.get(full) or readers.get(full.replace(".base_layer", ""))
                if reader is None:
                    missing.append(full)
                    continue
                loaded += 1
                if writer:
                    with torch.no_grad():
                        param.data.copy_(fit_to(reader(), param, full).to(param.dtype))
    if require_all and missing:
        raise KeyError(f"the weights lack {len(missing)} parameters, e.g. {missing[:3]}")
    return loaded


def build_partitioned(f: GeneratorFlavor, flavor_name: str, pretrained: str | None = None,
                      wan_folder: str | None = None) -> NormalDrivenWan:
    """The generator built inside an active ``deepspeed.zero.Init`` (partitioned as it is
    created), its weights loaded gathered from ``pretrained`` or ``wan_folder`` when given."""
    if f.lora_rank > 0:
        raise ValueError(f"flavor {flavor_name!r} has LoRA (rank {f.lora_rank}): LoRA trains under ZeRO-2 with "
                         "exclude_frozen_parameters (configs/train/dit_wan14b_lora_zero2.yaml); under ZeRO-3 the "
                         "frozen base would be all-gathered every step")
    model = NormalDrivenWan(f, flavor_name=flavor_name)
    if pretrained or wan_folder:
        readers, require_all = weight_readers(pretrained, wan_folder)
        load_gathered(model, readers, require_all)
    return model
