"""AED and APD with our own fitter: fit the generated video and the reference (ground truth or
driver) with :func:`preprocessing.clip_fit.fit_frames`, then compare per frame

- **AED** (average expression distance): mean |ψ_gen − ψ_ref| over the first ``num_expression``
  coefficients plus the jaw rotation (rad), per frame, averaged;
- **APD** (average pose distance): the angle (degrees) between the head's rotation in camera
  space (camera R · global · neck · head) of the two fits, per frame, averaged.

A clip the tracker cannot follow (no face in a generated video) gives NaN and its status.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial.transform import Rotation


@dataclass
class MotionFit:
    status: str
    expression: np.ndarray | None = None      # (T, K)
    jaw: np.ndarray | None = None             # (T, 3)
    head_rotation: np.ndarray | None = None   # (T, 3, 3) in camera space


def fit_motion(frames: np.ndarray, head, iters_scale: float = 0.5, seed: int = 0, min_side: int = 256) -> MotionFit:
    """Fit ``frames`` (T, H, W, 3) RGB, upscaled to ``min_side`` first (the tracker drops faces
    under 40 px); fewer iterations than a training fit (``iters_scale``)."""
    from preprocessing.clip_fit import fit_frames
    from preprocessing.fitting import FitConfig

    frames = np.ascontiguousarray(frames)
    if min(frames.shape[1:3]) < min_side:       # small generated frames: the tracker's face-size floor
        import cv2
        r = min_side / min(frames.shape[1:3])
        frames = np.stack([cv2.resize(f, (round(f.shape[1] * r), round(f.shape[0] * r)),
                                      interpolation=cv2.INTER_CUBIC) for f in frames])
    cfg = FitConfig(seed=seed)
    cfg.iters_rigid = max(10, int(cfg.iters_rigid * iters_scale))
    cfg.iters_expression = max(20, int(cfg.iters_expression * iters_scale))
    clip = fit_frames(frames, head, config=cfg)
    if clip.fit is None:
        return MotionFit(status=clip.status)
    p = clip.fit.params
    rot = lambda x: Rotation.from_rotvec(x.detach().numpy().astype(np.float64)).as_matrix()
    cam = clip.fit.camera.R.detach().numpy().astype(np.float64).reshape(-1, 3, 3)
    head_rot = cam @ rot(p.global_orient) @ rot(p.neck_pose) @ rot(p.head_pose)
    return MotionFit("ok", p.expression.detach().numpy(), p.jaw_pose.detach().numpy(), head_rot)


def expression_pose_distance(gen: MotionFit, ref: MotionFit, num_expression: int = 50) -> dict[str, float]:
    """AED and APD (see the module doc) between two fits of equally long videos."""
    if gen.status != "ok" or ref.status != "ok":
        return {"aed": float("nan"), "apd_deg": float("nan"), "fit_status": f"gen={gen.status} ref={ref.status}"}
    n = min(len(gen.expression), len(ref.expression))
    aed = np.abs(gen.expression[:n, :num_expression] - ref.expression[:n, :num_expression]).mean(1) \
        + np.abs(gen.jaw[:n] - ref.jaw[:n]).mean(1)
    rel = np.einsum("tij,tkj->tik", gen.head_rotation[:n], ref.head_rotation[:n])
    angle = np.degrees(np.arccos(np.clip((np.trace(rel, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    return {"aed": float(aed.mean()), "apd_deg": float(angle.mean()), "fit_status": "ok"}


def aed_apd(generated: np.ndarray, reference: np.ndarray, head, reference_fit: MotionFit | None = None,
            iters_scale: float = 0.5) -> tuple[dict[str, float], MotionFit]:
    """Fit both videos (or reuse ``reference_fit``) and compare; returns (metrics, reference fit)."""
    torch.manual_seed(0)
    ref = reference_fit or fit_motion(reference, head, iters_scale)
    return expression_pose_distance(fit_motion(generated, head, iters_scale), ref), ref
