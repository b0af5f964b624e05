"""Per-video metrics on uint8 RGB frames (T, H, W, 3): pixels (:mod:`models.metrics`), temporal jitter,
identity drift. Identity embeddings are in :mod:`.identity`, expression/pose in :mod:`.motion`."""
from __future__ import annotations

import math

import numpy as np
import torch

from models.metrics import PSNR_CAP_DB, UINT8, frame_psnr, l1, ssim

__all__ = ["PSNR_CAP_DB", "identity_drift", "nanmean", "per_frame_psnr", "pixel_metrics", "temporal_jitter"]


def _frames(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, H, W) (values still in [0, 255])."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames (T, H, W, 3), got {frames.shape}")
    return torch.as_tensor(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)


def _check_pair(pred: np.ndarray, target: np.ndarray) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in shape")


def pixel_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """PSNR (dB, per frame then averaged; capped at ``PSNR_CAP_DB``), SSIM and L1 (in [0, 1] units)
    of a generated video against its ground truth (:mod:`models.metrics`, the one definition)."""
    _check_pair(pred, target)
    p, t = _frames(pred), _frames(target)
    psnr = frame_psnr(p, t, UINT8)
    return {"psnr": float(psnr.mean()), "psnr_capped": bool((psnr >= PSNR_CAP_DB).any()),
            "ssim": ssim(p, t, UINT8), "l1": l1(p, t, UINT8)}


def per_frame_psnr(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """PSNR per frame (dB, capped), for plots."""
    _check_pair(pred, target)
    return frame_psnr(_frames(pred), _frames(target), UINT8).numpy()


def temporal_jitter(frames: np.ndarray, reference: np.ndarray | None = None) -> dict[str, float]:
    """Flicker: the mean absolute second temporal difference of the frames (per pixel, [0, 1]
    units; steady motion scores 0, frame-to-frame flicker high). With a ``reference`` video of
    the same motion (the ground truth or the driver), also its own score and the ratio."""
    def score(x: np.ndarray) -> float:
        if len(x) < 3:
            return float("nan")
        v = x.astype(np.int32)                       # exact on uint8 input
        return float(np.abs(v[2:] - 2 * v[1:-1] + v[:-2]).mean() / 255.0)
    out = {"jitter": score(frames)}
    if reference is not None:
        out["jitter_reference"] = score(reference)
        out["jitter_ratio"] = out["jitter"] / out["jitter_reference"] if out["jitter_reference"] > 0 else float("nan")
    return out


def identity_drift(similarity: np.ndarray, fps: float = 25.0) -> dict[str, float]:
    """Identity drift over time from per-frame identity similarity to the source (NaN where no
    face was found): the least-squares slope (similarity per second; negative = drifting away)
    and the mean of the first quarter minus the mean of the last quarter."""
    s = np.asarray(similarity, np.float64)
    ok = np.isfinite(s)
    out = {"drift_per_s": float("nan"), "drift_first_last": float("nan"), "frames_with_face": int(ok.sum())}
    if ok.sum() >= 2:
        t = np.arange(len(s))[ok] / fps
        out["drift_per_s"] = float(np.polyfit(t, s[ok], 1)[0]) if np.ptp(t) > 0 else float("nan")
    q = max(1, len(s) // 4)
    first, last = s[:q][np.isfinite(s[:q])], s[-q:][np.isfinite(s[-q:])]
    if len(first) and len(last):
        out["drift_first_last"] = float(first.mean() - last.mean())
    return out


def nanmean(values) -> float:
    """Mean over the finite values (NaN when none)."""
    v = np.asarray(list(values), np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else math.nan
