"""A landmark embedding: where the tracker's 68 points lie on a head model (faces + barycentric
coordinates), read for the job, ``expportrait fit`` and the fitter's per-point weights.

:mod:`preprocessing.landmark_calibration` makes these files (it runs the job's decode and tracking on
synthetic renders); this module only reads, resolves and applies them, so the clip stages import
it without importing the calibration. File format: an npz with ``faces`` (68,) int64 faces of the
full model, ``bary`` (68, 3) float32, ``model_key`` (:func:`model_key`), ``convention``
(``mediapipe_ibug68``), ``residual_pct`` (68,) the calibration's median distance per point in % of
face width, ``model_residual_pct`` (68,) the same for the model's own iBUG-68 definitions, ``frames``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CONVENTION = "mediapipe_ibug68"
EMBEDDING_DIR = Path(__file__).parent / "landmark_embeddings"


def model_key(model) -> str:
    """Digest of a model's template geometry and faces (an ``SMPLXModelData``): the embedding
    is only valid for that mesh."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(model.v_template, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(model.f, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


@dataclass
class LandmarkEmbedding:
    faces: np.ndarray                 # (68,) faces of the full model
    bary: np.ndarray                  # (68, 3)
    model_key: str
    residual_pct: np.ndarray          # (68,) median distance to the detections, % of face width
    model_residual_pct: np.ndarray    # (68,) the same for the model's own iBUG-68 points
    frames: int
    convention: str = CONVENTION

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = Path(path) / f"{self.convention}_{self.model_key}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, faces=self.faces.astype(np.int64), bary=self.bary.astype(np.float32),
                 model_key=self.model_key, convention=self.convention,
                 residual_pct=self.residual_pct.astype(np.float32),
                 model_residual_pct=self.model_residual_pct.astype(np.float32), frames=self.frames)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LandmarkEmbedding":
        with np.load(path) as z:
            return cls(faces=z["faces"], bary=z["bary"], model_key=str(z["model_key"]),
                       residual_pct=z["residual_pct"], model_residual_pct=z["model_residual_pct"],
                       frames=int(z["frames"]), convention=str(z["convention"]))

    def digest(self) -> str:
        """Of what the head uses (faces, coordinates, model key)."""
        h = hashlib.sha256(self.model_key.encode())
        h.update(np.ascontiguousarray(self.faces, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(self.bary, dtype=np.float32).tobytes())
        return h.hexdigest()[:16]

    def weights(self, floor: float = 0.05) -> np.ndarray:
        """Per-point landmark weights (68,) for the fitter: inverse variance relative to the
        inner points' median residual, (median / residual_k)², clipped to [floor, 1]."""
        ref = float(np.median(self.residual_pct[17:]))
        return np.clip((ref / np.maximum(self.residual_pct, 1e-6)) ** 2, floor, 1.0).astype(np.float32)

    def as_head_argument(self) -> tuple[np.ndarray, np.ndarray]:
        """What ``PersonalizedHead(landmark_embedding=...)`` takes."""
        return self.faces, self.bary


def resolve_embedding(setting: str | None, model) -> LandmarkEmbedding | None:
    """The embedding a job uses: ``None`` / ``"none"``: the model's own iBUG-68 definitions;
    ``"auto"``: the file made for this model in :data:`EMBEDDING_DIR` if there is one, else
    none; a path: that file, which must have been made for this model (a ValueError if not)."""
    if setting is None or setting == "none":
        return None
    key = model_key(model)
    if setting == "auto":
        path = EMBEDDING_DIR / f"{CONVENTION}_{key}.npz"
        return LandmarkEmbedding.load(path) if path.is_file() else None
    emb = LandmarkEmbedding.load(setting)
    if emb.model_key != key:
        raise ValueError(f"landmark embedding {setting} was made for model {emb.model_key}, not this one ({key}): "
                         "run python -m preprocessing.landmark_calibration --model MODEL")
    return emb


def no_calibration_note(model_path, setting_name: str) -> str:
    """What the job and ``expportrait fit`` print (stderr) when ``auto`` finds no calibrated
    file for the model at ``model_path`` (``setting_name``: how the user set it)."""
    return (f"{setting_name}: auto: no calibrated file for {model_path}; the tracker's points are fitted to "
            "the model's own iBUG-68 (run python -m preprocessing.landmark_calibration --model MODEL)")


def head_with_embedding(model, setting: str | None, subdivision_levels: int = 1):
    """(``PersonalizedHead`` of ``model`` with the embedding ``setting`` resolves to, that
    embedding or None): what the job's workers and ``expportrait fit`` build."""
    from models.head.head_model import PersonalizedHead

    emb = resolve_embedding(setting, model)
    head = PersonalizedHead(model, subdivision_levels=subdivision_levels,
                            landmark_embedding=emb.as_head_argument() if emb is not None else None)
    return head, emb
