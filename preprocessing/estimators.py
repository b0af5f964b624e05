"""Pluggable dense estimators (depth and/or normals) for real video; none is shipped.

An estimator is any callable ``frames (T, H, W, 3) uint8 -> DenseTargets``, built by a factory
named ``"package.module:factory"`` that receives a local weights path. Nothing is downloaded;
load weights with ``safetensors`` (or another format that does not unpickle). Estimated depth
is usually relative: set ``metric=False`` and the fitter scales it to the head (after the rigid
stage, by the median ratio under the landmarks).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np


@dataclass
class DenseTargets:
    depth: np.ndarray | None = None      # (T, H, W) camera depth, 0 where unknown
    normals: np.ndarray | None = None    # (T, H, W, 3) camera-space (OpenCV) unit normals
    metric: bool = True                  # False: depth is right up to one scale per clip


Estimator = Callable[[np.ndarray], DenseTargets]


def load_estimator(spec: str, weights: str | Path | None = None) -> Estimator:
    """Import ``package.module:factory`` and call ``factory(weights)``; clear errors."""
    if ":" not in spec:
        raise ValueError(f"estimator spec {spec!r} must look like 'package.module:factory'")
    module_name, factory_name = spec.split(":", 1)
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"estimator weights not found: {weights} (local files only; "
                                "nothing is downloaded)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import estimator module {module_name!r}: {exc}") from exc
    factory = getattr(module, factory_name, None)
    if factory is None:
        raise ValueError(f"module {module_name!r} has no factory {factory_name!r}")
    return factory(weights)
