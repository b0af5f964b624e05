"""Generated assets shared by the demo, tests and benchmarks (cached on disk)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_dir() -> Path:
    """``$EXPPORTRAIT_CACHE`` or ``~/.cache/expportrait``."""
    return Path(os.environ.get("EXPPORTRAIT_CACHE", Path.home() / ".cache" / "expportrait"))


def _generator_digest() -> str:
    from models.head import procedural_mesh, synthetic
    h = hashlib.sha1()
    for mod in (procedural_mesh, synthetic):
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:10]


def synthetic_model_file(seed: int = 0, directory: str | os.PathLike | None = None) -> Path:
    """Path of the synthetic SMPL-X-format model for ``seed``, built on first use.

    Cached under a name keyed by the generator's source, so editing the generator rebuilds it.
    """
    from models.head.smplx_file import save_smplx_model
    from models.head.synthetic import build_synthetic_model

    directory = Path(directory) if directory is not None else cache_dir() / "models"
    path = directory / f"synthetic_smplx_seed{seed}_{_generator_digest()}.npz"
    if not path.is_file():
        save_smplx_model(build_synthetic_model(seed), path)
    return path
