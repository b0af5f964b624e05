"""Export trained weights as safetensors with their config (``save_pretrained``).

``python -m training.export --checkpoint CKPT --out DIR`` exports the EMA weights of a
checkpoint: a Lightning ``.ckpt`` file or a DeepSpeed checkpoint folder (whose client state
holds the EMA callback's state), of the task named by the checkpoint's ``_class_path``.
``ExpressionTransfer.from_pretrained(DIR)`` / ``NormalDrivenWan.from_pretrained(DIR)`` load them.
"""
from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import torch
from diffusers.models.modeling_utils import ModelMixin


def export_pretrained(module: ModelMixin, weights: dict[str, torch.Tensor] | None, out: str | Path) -> Path:
    """Save a copy of ``module`` with ``weights`` (e.g. the EMA) replacing its parameters;
    buffers (such as the canonical vertices) come from ``module``."""
    out = Path(out)
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


def load_checkpoint_state(path: str | Path) -> dict:
    """The checkpoint dict of a Lightning file or a DeepSpeed folder (its client state; the
    engine's weights under ``module``), loaded with ``weights_only=True``; a file that is not
    one is the user's mistake naming it."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("**/mp_rank_00_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"{path} is not a DeepSpeed checkpoint folder")
        path = files[0]
    elif not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)     # tensors and plain data only
    except (pickle.UnpicklingError, EOFError, RuntimeError, KeyError, UnicodeDecodeError) as exc:
        from preprocessing.errors import UserError
        raise UserError(f"{path} is not a checkpoint (a Lightning .ckpt or a DeepSpeed folder): "
                        f"{type(exc).__name__}: {str(exc)[:200]}", checkpoint=str(path)) from None


def export_checkpoint(checkpoint: str | Path, out: str | Path, use_ema: bool = True) -> Path:
    """Rebuild the task from the checkpoint's hyperparameters and export (EMA) weights."""
    import importlib
    state = load_checkpoint_state(checkpoint)
    path = state["hyper_parameters"].get("_class_path", "training.tasks.transfer.TransferTask")   # the CLI's
    module_name, _, cls_name = path.rpartition(".")
    hparams = {k: v for k, v in state["hyper_parameters"].items() if not k.startswith("_")}
    task = getattr(importlib.import_module(module_name), cls_name)(**hparams)
    weights = state.get("state_dict") or state.get("module")
    if weights is not None:
        task.load_state_dict({k.removeprefix("module."): v for k, v in weights.items()}, strict=False)
    ema = None
    if use_ema:
        ema_state = state.get("callbacks", {}).get("EMA")
        if ema_state is None:
            raise KeyError(f"{checkpoint} holds no EMA state (callbacks: {list(state.get('callbacks', {}))})")
        ema = {k.removeprefix("model."): v for k, v in ema_state["shadow"].items() if k.startswith("model.")}
    return export_pretrained(task.export_module(), ema, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--no-ema", action="store_true", help="export the live weights instead")
    args = p.parse_args(argv)
    out = export_checkpoint(args.checkpoint, args.out, use_ema=not args.no_ema)
    print(json.dumps({"exported": str(out), "files": sorted(f.name for f in out.iterdir())}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
