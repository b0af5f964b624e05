"""The SMPL-X model file: locate, validate and load it; save the synthetic one.

The real SMPL-X files are licensed and never shipped. A user points the project at a local
copy with the config key ``head.model_path`` or the environment variable
``EXPPORTRAIT_SMPLX_PATH`` (a ``.npz`` file, or a folder holding ``SMPLX_NEUTRAL.npz``).
Loading never unpickles: only plain arrays are read (``allow_pickle=False``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ENV_VAR = "EXPPORTRAIT_SMPLX_PATH"
DEFAULT_FILENAME = "SMPLX_NEUTRAL.npz"

NUM_JOINTS = 55
NUM_SHAPE_COEFFS = 300
NUM_EXPRESSION_COEFFS = 100
NUM_POSE_BASIS = (NUM_JOINTS - 1) * 9  # 486
MIN_VERTICES = 9930  # smplx indexes fixed vertex ids (eyes, ears, feet, fingertips)
NUM_STATIC_LANDMARKS = 51
NUM_CONTOUR_LANDMARKS = 17
NUM_CONTOUR_BINS = 79

# SMPL-X joint indices used by the head representation.
JOINT = {
    "pelvis": 0, "spine1": 3, "spine2": 6, "spine3": 9, "neck": 12, "left_collar": 13,
    "right_collar": 14, "head": 15, "left_shoulder": 16, "right_shoulder": 17, "jaw": 22,
    "left_eye": 23, "right_eye": 24,
}
SMPLX_PARENTS = np.array(
    [-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 15, 15, 15,
     20, 25, 26, 20, 28, 29, 20, 31, 32, 20, 34, 35, 20, 37, 38,
     21, 40, 41, 21, 43, 44, 21, 46, 47, 21, 49, 50, 21, 52, 53], dtype=np.int64)


class HeadModelFileError(ValueError):
    """A head-model file is missing or does not have the SMPL-X layout."""


@dataclass
class SMPLXModelData:
    """The arrays of an SMPL-X model file, with the shapes ``smplx.SMPLX`` expects."""

    v_template: np.ndarray          # (V, 3)
    shapedirs: np.ndarray           # (V, 3, 300 + 100): shape then expression directions
    posedirs: np.ndarray            # (V, 3, 486) pose correctives
    J_regressor: np.ndarray         # (55, V)
    weights: np.ndarray             # (V, 55) skinning weights
    kintree_table: np.ndarray       # (2, 55); row 0 holds the parents
    f: np.ndarray                   # (F, 3) triangles
    lmk_faces_idx: np.ndarray       # (51,) static landmarks (iBUG 17..67)
    lmk_bary_coords: np.ndarray     # (51, 3)
    dynamic_lmk_faces_idx: np.ndarray    # (79, 17) contour (iBUG 0..16) per yaw bin
    dynamic_lmk_bary_coords: np.ndarray  # (79, 17, 3)
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_vertices(self) -> int:
        return int(self.v_template.shape[0])

    @property
    def parents(self) -> np.ndarray:
        return self.kintree_table[0].astype(np.int64)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {k: getattr(self, k) for k in _EXPECTED_SHAPES}
        out.update(self.extras)
        return out


# key -> shape spec; "V", "F", "K" are bound while checking.
_EXPECTED_SHAPES: dict[str, tuple] = {
    "v_template": ("V", 3),
    "shapedirs": ("V", 3, "K"),
    "posedirs": ("V", 3, NUM_POSE_BASIS),
    "J_regressor": (NUM_JOINTS, "V"),
    "weights": ("V", NUM_JOINTS),
    "kintree_table": (2, NUM_JOINTS),
    "f": ("F", 3),
    "lmk_faces_idx": (NUM_STATIC_LANDMARKS,),
    "lmk_bary_coords": (NUM_STATIC_LANDMARKS, 3),
    "dynamic_lmk_faces_idx": (NUM_CONTOUR_BINS, NUM_CONTOUR_LANDMARKS),
    "dynamic_lmk_bary_coords": (NUM_CONTOUR_BINS, NUM_CONTOUR_LANDMARKS, 3),
}


def resolve_model_path(configured: str | os.PathLike | None = None) -> Path:
    """Return the SMPL-X ``.npz`` file named by the config value or ``$EXPPORTRAIT_SMPLX_PATH``.

    A folder resolves to ``<folder>/SMPLX_NEUTRAL.npz``. Raises :class:`HeadModelFileError`
    naming the expected file when nothing is configured or the file is absent.
    """
    source = "head.model_path"
    if configured in (None, ""):
        configured = os.environ.get(ENV_VAR)
        source = f"${ENV_VAR}"
    if configured in (None, ""):
        raise HeadModelFileError(
            f"no SMPL-X model configured: set head.model_path in the config or {ENV_VAR} to "
            f"a {DEFAULT_FILENAME} file (or a folder holding it). SMPL-X is licensed and not "
            "shipped; `expportrait head synth-model --out PATH.npz` writes a synthetic one.")
    path = Path(configured).expanduser()
    if path.is_dir():
        path = path / DEFAULT_FILENAME
    if not path.is_file():
        raise HeadModelFileError(
            f"SMPL-X model file not found: {path} (from {source}). Expected {DEFAULT_FILENAME} "
            "from the SMPL-X download (smplx.is.tue.mpg.de), or a synthetic model written by "
            "`expportrait head synth-model`.")
    return path


def load_smplx_model(path: str | os.PathLike) -> SMPLXModelData:
    """Load and validate an SMPL-X ``.npz`` file; errors name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise HeadModelFileError(f"SMPL-X model file not found: {path}")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as exc:  # zip errors, truncated files, not an npz at all
        raise HeadModelFileError(f"cannot read SMPL-X model file {path}: not a valid .npz "
                                 f"archive ({type(exc).__name__}: {exc})") from exc
    with npz:
        missing = [k for k in _EXPECTED_SHAPES if k not in npz.files]
        if missing:
            raise HeadModelFileError(
                f"SMPL-X model file {path} lacks required key(s) {missing}; "
                f"has {sorted(npz.files)}")
        arrays: dict[str, np.ndarray] = {}
        for key in _EXPECTED_SHAPES:
            try:
                arrays[key] = np.asarray(npz[key])
            except ValueError as exc:  # object arrays need pickle: refuse
                raise HeadModelFileError(
                    f"SMPL-X model file {path}: key '{key}' is not a plain array ({exc})") from exc
        extras = {}
        for key in npz.files:     # other plain arrays (hands, uv maps, synthetic metadata)
            if key not in arrays:
                try:
                    extras[key] = np.asarray(npz[key])
                except ValueError:
                    pass          # object arrays (e.g. the real files' joint2num) need pickle

    _check_shapes(arrays, path)
    data = SMPLXModelData(**arrays, extras=extras)
    _check_values(data, path)
    return data


def save_smplx_model(data: SMPLXModelData, path: str | os.PathLike) -> Path:
    """Write ``data`` as an SMPL-X ``.npz`` (the layout ``smplx.SMPLX`` loads), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **data.arrays())
    os.replace(tmp, path)
    return path


def _check_shapes(arrays: dict[str, np.ndarray], path: Path) -> None:
    bound: dict[str, int] = {}
    for key, spec in _EXPECTED_SHAPES.items():
        shape = arrays[key].shape
        if len(shape) != len(spec):
            raise HeadModelFileError(f"SMPL-X model file {path}: '{key}' has shape {shape}, "
                                     f"expected {len(spec)} dimensions {spec}")
        for dim, want in zip(shape, spec):
            if isinstance(want, str):
                want = bound.setdefault(want, dim)
            if dim != want:
                raise HeadModelFileError(
                    f"SMPL-X model file {path}: '{key}' has shape {shape}, expected {spec} "
                    f"with {', '.join(f'{k}={v}' for k, v in bound.items())}")
    if bound["V"] < MIN_VERTICES:
        raise HeadModelFileError(f"SMPL-X model file {path}: {bound['V']} vertices; smplx "
                                 f"needs at least {MIN_VERTICES}")
    if bound["K"] < NUM_SHAPE_COEFFS + NUM_EXPRESSION_COEFFS:
        raise HeadModelFileError(
            f"SMPL-X model file {path}: shapedirs has {bound['K']} components; the head "
            f"representation needs {NUM_SHAPE_COEFFS} shape + {NUM_EXPRESSION_COEFFS} expression "
            "(the SMPL-X 2020 model file with 400 components)")


def _check_values(data: SMPLXModelData, path: Path) -> None:
    v, nf = data.num_vertices, data.f.shape[0]
    if data.f.min() < 0 or data.f.max() >= v:
        raise HeadModelFileError(f"SMPL-X model file {path}: faces index outside 0..{v - 1}")
    parents = data.parents
    children = parents[1:]
    root_ok = parents[0] < 0 or parents[0] >= NUM_JOINTS  # -1, or uint32 -1 in the real files
    if not root_ok or np.any(children < 0) or np.any(children >= np.arange(1, NUM_JOINTS)):
        raise HeadModelFileError(f"SMPL-X model file {path}: kintree_table parents must precede "
                                 "their children with the root first")
    for key in ("lmk_faces_idx", "dynamic_lmk_faces_idx"):
        idx = getattr(data, key)
        if idx.min() < 0 or idx.max() >= nf:
            raise HeadModelFileError(f"SMPL-X model file {path}: '{key}' indexes faces "
                                     f"outside 0..{nf - 1}")
    for key in ("v_template", "shapedirs", "posedirs", "J_regressor", "weights"):
        if not np.all(np.isfinite(getattr(data, key))):
            raise HeadModelFileError(f"SMPL-X model file {path}: '{key}' has non-finite values")
