"""A landmark embedding: where the tracker's points lie on a head model (faces + barycentric
coordinates), read for the job, ``expportrait fit`` and the fitter's per-point weights.

:mod:`preprocessing.landmark_calibration` makes these files (it runs the job's decode and tracking on
synthetic renders); this module only reads, resolves and applies them, so the clip stages import
it without importing the calibration. Two conventions: ``mediapipe_ibug68`` (the 68
iBUG-like points of ``tracking.MEDIAPIPE_TO_IBUG68``) and ``mediapipe478`` (all of MediaPipe's
478 points; the head's 68 landmarks are its ``MEDIAPIPE_TO_IBUG68`` rows, the fitter also fits
every point with its weight). ``auto`` prefers the 68-point file of a model (see
:data:`CONVENTIONS`); the 478-point one is used when named by path. File format: an
npz with ``faces`` (L,) int64 faces of the full model, ``bary`` (L, 3) float32, ``model_key``
(:func:`model_key`), ``convention``, ``residual_pct`` (L,) the calibration's median distance
per point in % of face width, ``model_residual_pct`` (L,) the same for the model's own iBUG-68
definitions (NaN for points that have none), ``frames``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CONVENTION = "mediapipe_ibug68"
DENSE_CONVENTION = "mediapipe478"
#: points per convention; ``auto`` tries them in this order: the 68 first (all 478 points fit no
#: better on the fitting benchmark and slow the fit to 3.3 frames/s, docs/fitting.md; a path opts in)
CONVENTIONS = {CONVENTION: 68, DENSE_CONVENTION: 478}
EMBEDDING_DIR = Path(__file__).parent / "landmark_embeddings"


def ibug68_rows(convention: str) -> np.ndarray:
    """Where the 68 iBUG-like points are among a convention's points."""
    if convention == DENSE_CONVENTION:
        from .tracking import MEDIAPIPE_TO_IBUG68
        return np.asarray(MEDIAPIPE_TO_IBUG68)
    return np.arange(68)


def embedding_file(convention: str, key: str) -> str:
    """The file name of a convention's embedding for the model with ``key`` (what :meth:`LandmarkEmbedding.save`
    writes into a folder and ``auto`` looks for in :data:`EMBEDDING_DIR`)."""
    return f"{convention}_{key}.npz"


def model_key(model) -> str:
    """Digest of a model's template geometry and faces (an ``SMPLXModelData``): the embedding
    is only valid for that mesh."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(model.v_template, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(model.f, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


@dataclass
class LandmarkEmbedding:
    faces: np.ndarray                 # (L,) faces of the full model
    bary: np.ndarray                  # (L, 3)
    model_key: str
    residual_pct: np.ndarray          # (L,) median distance to the detections, % of face width
    model_residual_pct: np.ndarray    # (L,) the same for the model's own iBUG-68 points (NaN: none)
    frames: int
    convention: str = CONVENTION

    def __post_init__(self) -> None:
        n = CONVENTIONS.get(self.convention)
        if n is None:
            raise ValueError(f"landmark embedding convention {self.convention!r}: expected one of {list(CONVENTIONS)}")
        if self.faces.shape != (n,) or self.bary.shape != (n, 3):
            raise ValueError(f"a {self.convention} embedding is {n} faces and ({n}, 3) barycentric coordinates, "
                             f"got {self.faces.shape} and {self.bary.shape}")

    @property
    def file_name(self) -> str:
        """What :meth:`save` names it in a folder (and ``auto`` looks for)."""
        return embedding_file(self.convention, self.model_key)

    @property
    def dense(self) -> bool:
        """More points than the 68 (the fitter then fits all of them)."""
        return self.convention != CONVENTION

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = Path(path) / self.file_name
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
        """Per-point landmark weights (68,) of the 68 iBUG-like points for the fitter: their rows
        of :meth:`dense_weights`."""
        return self.dense_weights(floor)[ibug68_rows(self.convention)]

    def dense_weights(self, floor: float = 0.05) -> np.ndarray:
        """Per-point weights (L,) of every point: inverse variance relative to the 68's inner
        points' median residual, (median / residual_k)², clipped to [floor, 1]."""
        ref = float(np.median(self.residual_pct[ibug68_rows(self.convention)][17:]))
        return np.clip((ref / np.maximum(self.residual_pct, 1e-6)) ** 2, floor, 1.0).astype(np.float32)

    def as_head_argument(self) -> tuple[np.ndarray, np.ndarray]:
        """What ``PersonalizedHead(landmark_embedding=...)`` takes: the 68 iBUG-like points."""
        rows = ibug68_rows(self.convention)
        return self.faces[rows], self.bary[rows]

    def dense_points(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """What ``Fitter(dense_landmarks=...)`` takes: (faces (L,), bary (L, 3), weights (L,)),
        or None for a 68-point embedding."""
        return (self.faces, self.bary, self.dense_weights()) if self.dense else None



def resolve_embedding(setting: str | None, model) -> LandmarkEmbedding | None:
    """The embedding a job uses: ``None`` / ``"none"``: the model's own iBUG-68 definitions;
    ``"auto"``: the file made for this model in :data:`EMBEDDING_DIR` if there is one, else
    none; a path: that file, which must have been made for this model (a ValueError if not)."""
    if setting is None or setting == "none":
        return None
    key = model_key(model)
    if setting == "auto":
        for convention in CONVENTIONS:
            path = EMBEDDING_DIR / embedding_file(convention, key)
            if path.is_file():
                return LandmarkEmbedding.load(path)
        return None
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
