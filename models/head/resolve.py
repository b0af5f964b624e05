"""The one head-model resolver: which SMPL-X-format file a command uses, and the reference a
trained model records so that it loads only against the same file.

Every command (``fit``, ``transfer``, the preprocessing job, the transfer task, ``generate``,
``reenact``, ``register``) picks its file with :func:`head_model_path`, in this order:

    a path given -> the config's value -> ``$EXPPORTRAIT_SMPLX_PATH`` -> the synthetic model
    rebuilt from its seed (cached under ``$EXPPORTRAIT_CACHE/models``)

A package records :func:`head_model_reference` (sha256 of the arrays, kind, the synthetic seed;
never the file). :func:`resolve_head_model` finds the local file for a reference and checks its
hash; a model trained on the synthetic head loads with no SMPL-X file at all, because the
synthetic file is rebuilt from its recorded seed and the rebuilt arrays hash the same.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from .smplx_file import ENV_VAR, resolve_model_path, save_smplx_model

SYNTHETIC = "synthetic"
SMPLX = "smplx"


class HeadModelMismatchError(ValueError):
    """The local head-model file is not the one the packaged models were trained with."""


def cache_dir() -> Path:
    """``$EXPPORTRAIT_CACHE`` or ``~/.cache/expportrait``."""
    return Path(os.environ.get("EXPPORTRAIT_CACHE", Path.home() / ".cache" / "expportrait"))


def _generator_digest() -> str:
    from . import procedural_mesh, synthetic
    h = hashlib.sha1()
    for mod in (procedural_mesh, synthetic):
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:10]


def synthetic_model_file(seed: int = 0, directory: str | os.PathLike | None = None) -> Path:
    """Path of the synthetic SMPL-X-format model for ``seed``, built on first use.

    Cached under a name keyed by the generator's source, so editing the generator rebuilds it.
    """
    from .synthetic import build_synthetic_model

    directory = Path(directory) if directory is not None else cache_dir() / "models"
    path = directory / f"synthetic_smplx_seed{seed}_{_generator_digest()}.npz"
    if not path.is_file():
        save_smplx_model(build_synthetic_model(seed), path)
    return path


def head_model_path(given: str | os.PathLike | None = None, configured: str | os.PathLike | None = None,
                    synthetic_seed: int = 0) -> Path:
    """The head-model file a command uses: ``given`` (a CLI flag), else ``configured`` (a config
    value), else ``$EXPPORTRAIT_SMPLX_PATH``, else the synthetic model for ``synthetic_seed``.
    A folder means its ``SMPLX_NEUTRAL.npz``; a named file that is absent raises
    :class:`~models.head.smplx_file.HeadModelFileError`."""
    for value in (given, configured, os.environ.get(ENV_VAR)):
        if value not in (None, ""):
            return resolve_model_path(value)
    return synthetic_model_file(synthetic_seed)


def head_model_hash(path: str | os.PathLike) -> str:
    """sha256 of an SMPL-X-format ``.npz``'s arrays (names, dtypes, shapes, bytes; sorted), so
    re-saving the same arrays (zip timestamps) keeps the hash."""
    h = hashlib.sha256()
    with np.load(path, allow_pickle=False) as z:
        for k in sorted(z.files):
            a = np.ascontiguousarray(z[k])
            h.update(f"{k}|{a.dtype.str}|{a.shape}|".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def synthetic_seed_of(path: str | os.PathLike, digest: str | None = None) -> int | None:
    """The seed of ``path`` when it is this code's synthetic model (its recorded
    ``synthetic_seed`` rebuilds arrays with the same hash), else None."""
    with np.load(path, allow_pickle=False) as z:
        if "synthetic_seed" not in z.files:
            return None
        seed = int(z["synthetic_seed"])
    digest = digest or head_model_hash(path)
    return seed if head_model_hash(synthetic_model_file(seed)) == digest else None


def head_model_reference(path: str | os.PathLike | None, subdivision: int = 1) -> dict:
    """The package's reference to a head model: its hash and kind, never the file. ``path`` None
    means the synthetic model (seed 0); a file that is the synthetic model (a copy, e.g. the
    demo's) is recorded as ``synthetic`` too, so the package loads without any SMPL-X file."""
    path = Path(path) if path is not None else synthetic_model_file(0)
    digest = head_model_hash(path)
    seed = synthetic_seed_of(path, digest)
    return {"kind": SMPLX if seed is None else SYNTHETIC, "synthetic_seed": seed, "file_name": path.name,
            "sha256": digest, "subdivision": subdivision}


def resolve_head_model(reference: dict, local: str | os.PathLike | None = None) -> Path:
    """The local head-model file for a package, checked against its hash: ``local``, else
    ``$EXPPORTRAIT_SMPLX_PATH``, else (synthetic packages) the synthetic model rebuilt from its
    recorded seed. Raises :class:`HeadModelMismatchError` naming both hashes when the file differs."""
    if local is not None or os.environ.get(ENV_VAR):
        path = resolve_model_path(local)
    elif reference["kind"] == SYNTHETIC:
        path = synthetic_model_file(reference.get("synthetic_seed") or 0)
    else:
        path = resolve_model_path(None)          # raises: names the expected file
    digest = head_model_hash(path)
    if digest != reference["sha256"]:
        raise HeadModelMismatchError(
            f"head model {path} (sha256 {digest[:16]}…) is not the one this model was trained with "
            f"({reference['kind']} {reference['file_name']}, sha256 {reference['sha256'][:16]}…): set "
            f"${ENV_VAR} to that file; a model driven by another head model's normals renders wrong faces")
    return path
