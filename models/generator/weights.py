"""Checks of local diffusers-layout weight folders, before anything is loaded.

A folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or sharded:
``diffusion_pytorch_model.safetensors.index.json`` + shards). ``check_weights_folder`` builds
the model the config describes on the meta device (no memory) and compares every tensor name
and shape with the safetensors headers, so a missing folder, a missing file or a config that
does not match its weights fails with an error naming the folder and the problem.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"


class WeightsFolderError(ValueError):
    """A local weights folder is missing, incomplete, or does not match its config."""


def _shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    if (folder / WEIGHTS).is_file():
        files = [folder / WEIGHTS]
    elif (folder / INDEX).is_file():
        files = sorted({folder / f for f in json.loads((folder / INDEX).read_text())["weight_map"].values()})
    else:
        raise WeightsFolderError(f"weights folder {folder}: no {WEIGHTS} (nor {INDEX})")
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        if not f.is_file():
            raise WeightsFolderError(f"weights folder {folder}: shard {f.name} listed in {INDEX} is missing")
        try:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        except Exception as err:   # noqa: BLE001 - any unreadable header
            raise WeightsFolderError(f"weights folder {folder}: {f.name} is not a readable safetensors file "
                                     f"({err})") from err
    return shapes


def check_weights_folder(folder: str | Path, model_cls: type, expected: dict | None = None,
                         ignore_unexpected: tuple[str, ...] = ()) -> dict:
    """Validate ``folder`` for ``model_cls`` (a diffusers ModelMixin); returns its config.

    ``expected``: config entries that must match (e.g. a flavor's shapes); ``ignore_unexpected``:
    key prefixes the folder may hold beyond the model (e.g. the CLIP path of an I2V checkpoint).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsFolderError(f"weights folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise WeightsFolderError(f"weights folder {folder}: no config.json")
    try:
        config = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise WeightsFolderError(f"weights folder {folder}: config.json is not valid JSON ({err})") from err
    for key, value in (expected or {}).items():
        have = config.get(key)
        if (list(have) if isinstance(have, (list, tuple)) else have) != \
                (list(value) if isinstance(value, (list, tuple)) else value):
            raise WeightsFolderError(f"weights folder {folder}: config.json has {key}={have!r}, "
                                     f"the requested flavor needs {value!r}")
    stored = _shapes(folder)
    init_keys = set(model_cls.extract_init_dict(config)[0])
    with torch.device("meta"):
        model = model_cls(**{k: v for k, v in config.items() if k in init_keys})
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(wanted) - set(stored))
    if missing:
        raise WeightsFolderError(f"weights folder {folder}: {len(missing)} tensors of the config's model are "
                                 f"missing from the weights, e.g. {missing[:3]}")
    extra = sorted(k for k in set(stored) - set(wanted) if not k.startswith(ignore_unexpected))
    if extra:
        raise WeightsFolderError(f"weights folder {folder}: {len(extra)} tensors in the weights are not in the "
                                 f"config's model, e.g. {extra[:3]}")
    bad = [(k, stored[k], wanted[k]) for k in sorted(wanted) if stored[k] != wanted[k]]
    if bad:
        k, have, want = bad[0]
        raise WeightsFolderError(f"weights folder {folder}: config.json and weights disagree on {len(bad)} "
                                 f"tensors, e.g. {k!r} is {have} in the weights but {want} by the config")
    return config
