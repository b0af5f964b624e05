"""Export trained weights as safetensors with their config (``save_pretrained``).

``python -m training.export --checkpoint CKPT --out DIR`` exports the EMA weights of a
checkpoint: a Lightning ``.ckpt`` file or a DeepSpeed checkpoint folder (whose client state
holds the EMA callback's state), of the task named by the checkpoint's ``_class_path``. It is
also the one consolidation command of a sharded checkpoint: a ZeRO-3 folder (each rank's shard)
is merged into whole fp32 weights on CPU first (``--no-ema``: there is no EMA under ZeRO-3); a
LoRA checkpoint saved without its frozen base takes the base from the task's ``wan_folder``.
``ExpressionTransfer.from_pretrained(DIR)`` / ``NormalDrivenWan.from_pretrained(DIR)`` load them.
"""
from __future__ import annotations

import argparse
import json
import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from diffusers.models.modeling_utils import ModelMixin


def export_pretrained(module: ModelMixin, weights: dict[str, torch.Tensor] | None, out: str | Path) -> str | Path:
    """Save a copy of ``module`` with ``weights`` (e.g. the EMA) replacing its parameters;
    buffers (such as the canonical vertices) come from ``module``. ``out`` is a folder or a URL
    (``s3://...``: written locally, then uploaded file by file)."""
    from preprocessing import storage

    if storage.is_url(out):
        with storage.staged_folder(out) as local:
            _export_to_folder(module, weights, Path(local))
        return str(out)
    return _export_to_folder(module, weights, Path(out))


def _export_to_folder(module: ModelMixin, weights: dict[str, torch.Tensor] | None, out: Path) -> Path:
    state = {k: v.detach().float().cpu() for k, v in module.state_dict().items()}
    if weights:
        missing = {n for n, p in module.named_parameters() if p.requires_grad} - set(weights)
        if missing:
            raise KeyError(f"the weights lack {sorted(missing)[:5]}...")
        state.update({k: v.detach().float().cpu() for k, v in weights.items()})
    if isinstance(module, ModelMixin):
        copy = type(module).from_config(module.config)
        copy.load_state_dict(state)
        copy.save_pretrained(out, safe_serialization=True)
        return out
    # a composite module with its own save_pretrained (e.g. the generator's NormalDrivenWan)
    import copy as _copy
    clone = _copy.deepcopy(module).float().cpu()
    clone.load_state_dict(state)
    clone.save_pretrained(out)
    return out


def cast_weights_folder(folder: str | Path, dtype: torch.dtype) -> list[Path]:
    """Rewrite every ``*.safetensors`` under an exported folder with its floating-point tensors
    in ``dtype`` (e.g. bfloat16: half the size of fp32; loaders cast back to their dtype)."""
    from safetensors.torch import load_file, save_file
    files = sorted(Path(folder).rglob("*.safetensors"))
    for path in files:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
        save_file(state, str(path), metadata={"format": "pt"})
    return files


#: Starting points the project ships (``training/pretrained/<name>/``): a generator
#: (``generator/``, a ``NormalDrivenWan.save_pretrained`` folder in fp16) with the codec it was
#: trained on (``codec/``) and how it was made (``provenance.json``). ``expportrait demo``
#: fine-tunes from ``tiny_cpu``; ``benchmarks/generator.py --ship DIR`` writes one.
SHIPPED_INITS = Path(__file__).resolve().parent / "pretrained"


@dataclass(frozen=True)
class InitFolder:
    """A shipped starting point: ``generator`` (``--model.init_args.pretrained``), ``codec``
    (``--model.init_args.codec``) and its ``provenance``."""
    root: Path
    generator: Path
    codec: Path
    provenance: dict


def check_init_target(out: str | Path) -> None:
    """ValueError unless ``out`` can be (re)written by :func:`write_init_folder`: absent, an
    empty folder, or an init folder (it has a ``provenance.json``); anything else is not replaced."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "provenance.json").is_file())):
        raise ValueError(f"{out} exists and is not an init folder (no provenance.json): it would be replaced")


def write_init_folder(generator_export: str | Path, codec: str | Path, out: str | Path,
                      provenance: dict) -> InitFolder:
    """Copy a generator export (fp16: half the bytes; loaders cast back) and its codec into
    ``out`` (an earlier init folder there is replaced, see :func:`check_init_target`) with
    ``provenance.json``."""
    import shutil
    out = Path(out)
    check_init_target(out)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(generator_export, out / "generator")
    cast_weights_folder(out / "generator", torch.float16)
    shutil.copytree(codec, out / "codec")
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2, default=str) + "\n")
    return read_init_folder(out)


def read_init_folder(folder: str | Path) -> InitFolder:
    """A folder written by :func:`write_init_folder` (a name: ``SHIPPED_INITS / name``); a
    FileNotFoundError names what is missing."""
    root = Path(folder)
    if not root.is_absolute() and not root.exists() and (SHIPPED_INITS / root).is_dir():
        root = SHIPPED_INITS / root
    parts = {"generator": root / "generator" / "generator.json", "codec": root / "codec" / "config.json",
             "provenance": root / "provenance.json"}
    missing = [str(v) for v in parts.values() if not v.is_file()]
    if missing:
        raise FileNotFoundError(f"init folder {root}: missing {', '.join(missing)} "
                                f"(written by benchmarks/generator.py --ship DIR)")
    return InitFolder(root, root / "generator", root / "codec", json.loads(parts["provenance"].read_text()))


def load_checkpoint_state(path: str | Path) -> dict:
    """The checkpoint dict of a Lightning file or a DeepSpeed folder (its client state; the
    engine's weights under ``module``), loaded with ``weights_only=True``; a file that is not
    one is the user's mistake naming it. A Lightning file may be a URL (``s3://...``)."""
    from preprocessing import storage

    if storage.is_url(path):
        if not storage.is_file(path):
            raise FileNotFoundError(f"checkpoint {path} does not exist (a Lightning .ckpt object)")
        import io
        path_or_buffer = io.BytesIO(storage.get_bytes(path))
        return _load_weights_only(path_or_buffer, path)
    path = Path(path)
    if path.is_dir():
        # ZeRO-1/2: mp_rank_00_model_states.pt; ZeRO-3: zero_pp_rank_<r>_mp_rank_00_model_states.pt a rank
        files = sorted(path.glob("**/mp_rank_00_model_states.pt")) or \
            sorted(path.glob("**/*mp_rank_00_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"{path} is not a DeepSpeed checkpoint folder")
        path = files[0]
    elif not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return _load_weights_only(path, path)


def _load_weights_only(source, path) -> dict:
    try:
        return torch.load(source, map_location="cpu", weights_only=True)     # tensors and plain data only
    except (pickle.UnpicklingError, EOFError, RuntimeError, KeyError, UnicodeDecodeError) as exc:
        from preprocessing.errors import UserError
        raise UserError(f"{path} is not a checkpoint (a Lightning .ckpt or a DeepSpeed folder): "
                        f"{type(exc).__name__}: {str(exc)[:200]}", checkpoint=str(path)) from None


def checkpoint_ema(state: dict, checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The EMA callback's fp32 weights in a checkpoint state, by the task's parameter names."""
    ema_state = state.get("callbacks", {}).get("EMA")
    if ema_state is None:
        raise KeyError(f"{checkpoint} holds no EMA state (callbacks: {list(state.get('callbacks', {}))}); "
                       "use the live weights instead (--no-ema)")
    return dict(ema_state["shadow"])


@contextmanager
def weights_swapped(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[torch.nn.Module]:
    """``module`` with ``weights`` (e.g. the EMA, by parameter name) copied into its parameters
    for the block, the live values put back after."""
    params = dict(module.named_parameters())
    saved = {}
    with torch.no_grad():
        for name, value in weights.items():
            if name in params:
                saved[name] = params[name].detach().clone()
                params[name].copy_(value.to(params[name].dtype))
    try:
        yield module
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


def task_from_checkpoint(checkpoint: str | Path, use_ema: bool = True, overrides: dict | None = None,
                         default_class: str = "training.tasks.transfer.TransferTask"):
    """The one checkpoint -> (EMA) weights loader: the task named by the checkpoint's
    ``_class_path`` rebuilt from its hyperparameters (``overrides`` replace those it has, e.g.
    ``pretrained=None`` to skip loading base weights that the checkpoint replaces anyway), its
    weights loaded, then the EMA weights copied in (``use_ema``). Returns (task, hyperparameters);
    a ValueError when the checkpoint's weights lack the task's model tensors."""
    import importlib
    state = load_checkpoint_state(checkpoint)
    hp = state.get("hyper_parameters", {})
    module_name, _, cls_name = hp.get("_class_path", default_class).rpartition(".")   # the CLI's
    hparams = {k: v for k, v in hp.items() if not k.startswith("_")}
    hparams.update({k: v for k, v in (overrides or {}).items() if k in hparams})
    task = getattr(importlib.import_module(module_name), cls_name)(**hparams)
    task.configure_model()                   # a task that builds its model there (the generator) builds it now
    weights = state.get("state_dict") or state.get("module")
    if weights is not None and any(v.numel() == 0 for v in weights.values()):   # ZeRO-3: per-rank placeholders
        weights = consolidated_zero3_weights(checkpoint)
    if weights is not None:
        missing, _ = task.load_state_dict({k.removeprefix("module."): v for k, v in weights.items()}, strict=False)
        # a checkpoint saved with exclude_frozen_parameters (LoRA) lacks the frozen base: the task built it
        trainable = {n for n, p in task.named_parameters() if p.requires_grad}
        lacking = [k for k in missing if k.startswith("model.") and k in trainable]
        if lacking:
            raise ValueError(f"{checkpoint}: its weights lack {len(lacking)} model tensors, e.g. {lacking[:2]}")
    if use_ema:
        ema = checkpoint_ema(state, checkpoint)
        trainable = {n for n, p in task.named_parameters() if p.requires_grad and n.startswith("model.")}
        if trainable - set(ema):
            raise KeyError(f"{checkpoint}: the EMA lacks {sorted(trainable - set(ema))[:5]}...")
        with torch.no_grad():
            params = dict(task.named_parameters())
            for name, value in ema.items():
                if name in params:
                    params[name].copy_(value.to(params[name].dtype))
    return task, hparams


@contextmanager
def deepspeed_loads_weights_only(*allowed: type) -> Iterator[None]:
    """Within the block every ``torch.load`` (DeepSpeed's checkpoint readers unpickle) is
    ``weights_only=True``: tensors and plain data, plus the plain DeepSpeed classes its
    checkpoints hold, allowed by name (the ZeRO stage enum, the loss-scaler record, and
    ``allowed``)."""
    from unittest import mock

    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    real_load = torch.load

    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        kwargs.pop("mmap", None)
        return real_load(*args, **kwargs)

    with mock.patch("torch.load", safe_load), torch.serialization.safe_globals([ZeroStageEnum, LossScaler, *allowed]):
        yield


def consolidated_zero3_weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The fp32 weights of a ZeRO-3 checkpoint folder, merged from every rank's shard on CPU
    (DeepSpeed's ``zero_to_fp32``), by the task's parameter names; loaded weights-only
    (:func:`deepspeed_loads_weights_only`)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    folder = Path(checkpoint)
    tag = next(p.parent.name for p in folder.glob("*/*mp_rank_00_model_states.pt"))
    with deepspeed_loads_weights_only():
        state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
    return {k.removeprefix("_forward_module."): v for k, v in state.items()}


def export_checkpoint(checkpoint: str | Path, out: str | Path, use_ema: bool = True) -> Path:
    """Rebuild the task from the checkpoint (:func:`task_from_checkpoint`) and export its
    (EMA) weights."""
    task, _ = task_from_checkpoint(checkpoint, use_ema)
    return export_pretrained(task.export_module(), None, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--no-ema", action="store_true", help="export the live weights instead")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="stored weights' dtype")
    args = p.parse_args(argv)
    from preprocessing import storage
    if args.dtype == "bf16" and storage.is_url(args.out):          # checked before the work
        print(json.dumps({"error": "UserError", "message": f"--dtype bf16 casts a local export folder, not "
                          f"{args.out}: export to a path, then upload it", "out": args.out}))
        return 2
    out = export_checkpoint(args.checkpoint, args.out, use_ema=not args.no_ema)
    if args.dtype == "bf16":
        cast_weights_folder(Path(out), torch.bfloat16)
    print(json.dumps({"exported": str(out), "files": storage.listdir(out)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
