"""Fit a real clip end to end: track the face, crop, fit, score (pure: no file I/O).

Frames come from :func:`preprocessing.ingest.open_video`; the result holds the aligned crops,
the fit (parameters, Δg, Δf, camera per frame) and per-frame quality. Intrinsics: the source
frame is taken as a pinhole camera of ``fov_deg`` vertical field of view (unknown for real
footage), and each crop's intrinsics follow from its box.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from models.head.head_model import PersonalizedHead
from models.render.conditions import render_conditions

from .fitting import FitConfig, Fitter, FitInputs, FitResult
from .tracking import FaceTrack, FaceTracker


@dataclass
class ClipFit:
    status: str                       # ok, or a tracking status (no_face, multi_face, ...)
    reason: str = ""
    track: FaceTrack | None = None
    fit: FitResult | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict:
        out = {"status": self.status, "reason": self.reason}
        if self.fit is not None:
            qc = self.fit.qc
            statuses = self.fit.frame_status
            out.update({
                "frames": len(statuses),
                "statuses": {s: statuses.count(s) for s in sorted(set(statuses))},
                "median_landmark_error_pct": float(np.nanmedian(qc["landmark_error_pct"])),
                "max_landmark_error_pct": float(np.nanmax(qc["landmark_error_pct"])),
                "median_jitter_mm": float(np.median(qc["jitter_mm"])),
            })
            if "photometric_residual" in qc:
                out["median_photometric_residual"] = float(np.median(qc["photometric_residual"]))
                out["median_photometric_residual_no_dynamic"] = float(
                    np.median(qc["photometric_residual_no_dynamic"]))
        total = sum(self.seconds.values())
        if self.fit is not None and total > 0:
            out["fps"] = len(self.fit.frame_status) / total
        out["seconds"] = {k: round(v, 3) for k, v in self.seconds.items()}
        return out


def crop_camera_matrices(K: np.ndarray, boxes: np.ndarray, crop_size: int) -> np.ndarray:
    """Intrinsics (T, 3, 3) of square crops (x0, y0, side) of frames with intrinsics ``K``
    ((3, 3) or (T, 3, 3)); crop pixel u sees frame pixel x = x0 + u * side / crop_size, as
    :func:`preprocessing.tracking.FaceTracker` cuts them."""
    K = np.broadcast_to(np.asarray(K, np.float32), (len(boxes), 3, 3))
    s = (crop_size / boxes[:, 2]).astype(np.float32)[:, None]
    k = K.copy()
    k[:, 0] = (K[:, 0] - boxes[:, 0:1].astype(np.float32) * K[:, 2]) * s
    k[:, 1] = (K[:, 1] - boxes[:, 1:2].astype(np.float32) * K[:, 2]) * s
    return k


def frame_camera_matrices(K: np.ndarray, boxes: np.ndarray, crop_size: int, frame_side: int,
                          size: int | None = None) -> np.ndarray:
    """The inverse of :func:`crop_camera_matrices`: intrinsics (T, 3, 3) of the whole square frame
    (side ``frame_side``; resized to ``size`` as :meth:`models.render.camera.Camera.resized`
    does, None: not resized) of crops (x0, y0, side) with intrinsics ``K``."""
    boxes = np.asarray(boxes, np.float64)
    s = crop_size / boxes[:, 2]
    frame_box = np.stack([-boxes[:, 0] * s, -boxes[:, 1] * s, frame_side * s], 1)   # the frame in crop pixels
    k = crop_camera_matrices(K, frame_box, frame_side)
    if size and size != frame_side:
        r = np.float32(size / frame_side)
        k[:, :2, :2] *= r
        k[:, :2, 2] = (k[:, :2, 2] + 0.5) * r - 0.5
    return k


def crop_intrinsics(boxes: np.ndarray, frame_size: tuple[int, int], crop_size: int,
                    fov_deg: float) -> torch.Tensor:
    """Per-frame intrinsics (T, 3, 3) of square crops (x0, y0, side) of a pinhole frame."""
    w, h = frame_size
    f = 0.5 * h / math.tan(math.radians(fov_deg) / 2)
    K = np.array([[f, 0, (w - 1) / 2], [0, f, (h - 1) / 2], [0, 0, 1]], np.float32)
    return torch.as_tensor(crop_camera_matrices(K, boxes, crop_size))


def fit_frames(frames: np.ndarray, head: PersonalizedHead, tracker: FaceTracker | None = None,
               config: FitConfig | None = None, fov_deg: float = 20.0, crop: bool = True,
               fitter: Fitter | None = None, estimator=None, betas=None,
               static_offsets=None) -> ClipFit:
    """Track and fit RGB frames (T, H, W, 3). Never raises for a face-less clip: the status
    says what happened. ``estimator`` (see :mod:`preprocessing.estimators`) adds depth and
    normal targets from the crops; ``betas``/``static_offsets`` reuse an identity. The crops
    and their validity masks go to the fitter's photometric stage (no estimator needed)."""
    tracker = tracker or FaceTracker()
    seconds = {}
    t0 = time.perf_counter()
    track = tracker.track(frames, crop=crop)
    seconds["track"] = time.perf_counter() - t0
    if not track.ok:
        return ClipFit(status=track.status.value, reason=track.reason, track=track, seconds=seconds)
    h, w = frames.shape[1:3]
    size = track.crops.shape[1]
    K = crop_intrinsics(track.boxes, (w, h), size, fov_deg)
    fitter = fitter or Fitter(head, config)
    extra = {}                                           # dense targets, every detected point
    if estimator is not None:
        t0 = time.perf_counter()
        est = estimator(track.crops)
        seconds["estimate"] = time.perf_counter() - t0
        inside = torch.as_tensor(track.valid)            # targets outside the source frame: unknown
        extra = {"depth": None if est.depth is None else torch.as_tensor(est.depth).float() * inside,
                 "normals": None if est.normals is None else torch.as_tensor(est.normals).float() * inside[..., None],
                 "depth_is_metric": est.metric}
    if fitter.points_head is not None and track.landmarks478 is not None:     # a dense embedding: every point
        points = track.landmarks478[..., :2]
        extra["dense_landmarks"] = torch.as_tensor(points)
        extra["dense_landmark_weights"] = landmark_weights(track, points)
    inputs = FitInputs(landmarks=torch.as_tensor(track.landmarks68), image_size=(size, size),
                       landmark_weights=landmark_weights(track), K=K,
                       images=torch.as_tensor(track.crops), valid=torch.as_tensor(track.valid), **extra)
    t0 = time.perf_counter()
    result = fitter.fit(inputs, betas=betas, static_offsets=static_offsets)
    seconds["fit"] = time.perf_counter() - t0
    return ClipFit(status="ok", track=track, fit=result, seconds=seconds)


def landmark_weights(track: FaceTrack, points: np.ndarray | None = None) -> torch.Tensor:
    """(T, L) weights of ``points`` (default the 68, ``track.landmarks68``): 0 for frames without
    landmarks and for points that fall on crop pixels outside the source frame (there MediaPipe
    can only guess)."""
    points = track.landmarks68 if points is None else points
    t, size = points.shape[0], track.valid.shape[1]
    xy = np.nan_to_num(np.rint(points), nan=-1).astype(np.int64)
    on_crop = (xy >= 0).all(-1) & (xy < size).all(-1)
    inside = np.zeros(xy.shape[:2], bool)
    frames = np.broadcast_to(np.arange(t)[:, None], xy.shape[:2])
    inside[on_crop] = track.valid[frames[on_crop], xy[..., 1][on_crop], xy[..., 0][on_crop]]
    w = track.detected[:, None] & (inside | ~on_crop)        # off the crop: the fitter's own call
    return torch.as_tensor(w, dtype=torch.float32)


def overlay_frames(clip: ClipFit, head: PersonalizedHead, alpha: float = 0.55) -> np.ndarray:
    """[crop | crop with the fitted normal map blended on | normal map], uint8 frames, with the
    detected landmarks (green) and the fitted landmarks (red) on the middle panel."""
    fit, crops = clip.fit, clip.track.crops
    out = []
    t = len(crops)
    with torch.no_grad():
        for s in range(0, t, 16):
            fr = slice(s, min(s + 16, t))
            params = fit.params.map(lambda x: x[fr] if x.shape[0] == t else x)
            head_out = head(params, fit.static_offsets, fit.dynamic_offsets[fr])
            cam = fit.camera.select(fr)
            maps = render_conditions(head_out.vertices.contiguous(), head.faces, cam, head.face_mask)
            rgb = maps.normal_rgb().numpy()
            sil = maps.silhouette.numpy()[..., None]
            lm = cam.project(cam.to_camera(head_out.landmarks)).numpy()
            for j, k in enumerate(range(fr.start, fr.stop)):
                blend = (crops[k] * (1 - alpha * sil[j]) + rgb[j] * alpha * sil[j]).astype(np.uint8)
                _dots(blend, clip.track.landmarks68[k], (0, 255, 0))
                _dots(blend, lm[j], (255, 0, 0))
                out.append(np.concatenate([crops[k], blend, rgb[j]], 1))
    return np.stack(out)


def _dots(img: np.ndarray, pts: np.ndarray, colour) -> None:
    h, w = img.shape[:2]
    for x, y in np.nan_to_num(pts, nan=-10):
        xi, yi = int(round(x)), int(round(y))
        if 0 <= xi < w and 0 <= yi < h:
            img[max(0, yi - 1):yi + 1, max(0, xi - 1):xi + 1] = colour
