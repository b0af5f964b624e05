"""AED and APD with our own fitter: fit the generated video and the reference (ground truth or
driver) with :func:`preprocessing.clip_fit.fit_frames`, then compare per frame

- **AED** (average expression distance): mean |ψ_gen − ψ_ref| over the first ``num_expression``
  coefficients plus the jaw rotation (rad), per frame, averaged;
- **APD** (average pose distance): the angle (degrees) between the head's rotation in camera
  space (camera R · global · neck · head) of the two fits, per frame, averaged;
- **APD motion**: the same angle between the two heads' rotations *since each video's first
  frame* (R_t R_0ᵀ), frames 1.., averaged. Reenactment retargets the driver's motion since its
  first frame onto the source's own pose, so across identities even the exact answer keeps the
  source's starting pose, and plain APD to the driver measures that offset as much as the
  motion (on the synthetic world's cross pairs the exact answer's APD to the driver is at or
  above a still photo's); APD motion is what "the head follows the driver" means there (a
  still photo scores the driver's own motion, the exact answer ~0).

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
    head_rot = head_rotation_in_camera(clip.fit.camera.R, p.global_orient, p.neck_pose, p.head_pose)
    return MotionFit("ok", p.expression.detach().numpy(), p.jaw_pose.detach().numpy(), head_rot)


def head_rotation_in_camera(camera_R, global_orient, neck_pose, head_pose) -> np.ndarray:
    """(T, 3, 3) float64: the head's rotation in camera space, camera R · global · neck · head
    (``camera_R`` (T or 1, 3, 3); the joints (T, 3) axis-angle; tensors or arrays)."""
    arr = lambda x: np.asarray(x.detach().cpu().numpy() if torch.is_tensor(x) else x, np.float64)  # noqa: E731
    rot = lambda x: Rotation.from_rotvec(arr(x).reshape(-1, 3)).as_matrix()                          # noqa: E731
    return arr(camera_R).reshape(-1, 3, 3) @ rot(global_orient) @ rot(neck_pose) @ rot(head_pose)


def rotation_angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(T,) degrees of the rotation between (T, 3, 3) ``a`` and ``b``."""
    rel = np.einsum("tij,tkj->tik", a, b)
    return np.degrees(np.arccos(np.clip((np.trace(rel, axis1=1, axis2=2) - 1) / 2, -1, 1)))


def expression_pose_distance(gen: MotionFit, ref: MotionFit, num_expression: int = 50,
                             first: int = 0) -> dict[str, float]:
    """AED, APD and APD motion (see the module doc) between two fits of equally long videos: AED
    and APD over frames ``first``.. (1: frame 0 only anchors the motion, e.g. a source image
    before the driven frames), APD motion over frames 1.. (NaN for one frame)."""
    if gen.status != "ok" or ref.status != "ok":
        return {"aed": float("nan"), "apd_deg": float("nan"), "apd_motion_deg": float("nan"),
                "fit_status": f"gen={gen.status} ref={ref.status}"}
    n = min(len(gen.expression), len(ref.expression))
    f = slice(first, n)
    aed = np.abs(gen.expression[f, :num_expression] - ref.expression[f, :num_expression]).mean(1) \
        + np.abs(gen.jaw[f] - ref.jaw[f]).mean(1)
    g, r = gen.head_rotation[:n], ref.head_rotation[:n]
    since_first = lambda x: np.einsum("tij,kj->tik", x[1:], x[0])       # noqa: E731  R_t R_0ᵀ
    motion = rotation_angle_deg(since_first(g), since_first(r)).mean() if n > 1 else float("nan")
    return {"aed": float(aed.mean()), "apd_deg": float(rotation_angle_deg(g[f], r[f]).mean()),
            "apd_motion_deg": float(motion), "fit_status": "ok"}


def aed_apd(generated: np.ndarray, reference: np.ndarray, head, reference_fit: MotionFit | None = None,
            iters_scale: float = 0.5) -> tuple[dict[str, float], MotionFit]:
    """Fit both videos (or reuse ``reference_fit``) and compare; returns (metrics, reference fit)."""
    torch.manual_seed(0)
    ref = reference_fit or fit_motion(reference, head, iters_scale)
    return expression_pose_distance(fit_motion(generated, head, iters_scale), ref), ref
