"""A subject's fitted clip (per-frame SMPL-X parameters, β, Δg, cameras) and the expression +
pose transfer from a driver's clip onto a target's (library code: ``expportrait transfer`` /
``edit`` and inference call it).

A fitted clip is ``fit.npz`` from ``expportrait fit`` (or its folder), a synthetic corpus clip
``clips/<id>.npz`` (β and Δg read from ``identities/<id>.npz`` beside it), or a fit made by the
preprocessing stages (:func:`fitted_from_clip`).

- expression: the driver's (ψ, jaw), edited per region (mouth, eyes, brows) and jaw scale,
  gives the target's Δf through the transfer module (without one Δf is zero); ``mode="pose"``
  keeps the target's reference expression.
- pose: the driver's head/neck motion relative to its first frame, applied to the target's
  reference pose, seen in the target's camera (models/transfer/retarget.py for the
  convention); ``mode="expression"`` keeps the target's reference pose and camera.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

PER_FRAME = ("expression", "jaw_pose", "global_orient", "neck_pose", "head_pose", "leye_pose",
             "reye_pose", "transl")


@dataclass
class FittedClip:
    """SMPL-X parameters per frame, β, Δg and cameras of one subject's clip."""

    arrays: dict[str, np.ndarray]       # PER_FRAME (T, ...) + camera_K/R/t (T, ...)
    betas: np.ndarray                   # (300,)
    static_offsets: np.ndarray          # (N_s, 3)
    image_size: int
    source: str
    dynamic_offsets: np.ndarray | None = None   # (T, N_face, 3) the fitted Δf (fitted here), else None

    @property
    def num_frames(self) -> int:
        return int(self.arrays["expression"].shape[0])

    def frame(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[i] for k, v in self.arrays.items()}

    def select(self, frames: slice) -> "FittedClip":
        """The clip's frames ``frames`` (e.g. ``slice(0, 20, 3)``)."""
        return FittedClip({k: v[frames] for k, v in self.arrays.items()}, self.betas, self.static_offsets,
                          self.image_size, self.source,
                          None if self.dynamic_offsets is None else self.dynamic_offsets[frames])


def fitted_from_clip(clip, source: str) -> FittedClip:
    """The :class:`FittedClip` of a fit made by the preprocessing stages (a
    :class:`preprocessing.clip_fit.ClipFit`), per-frame arrays float32, cameras per frame."""
    fit = clip.fit
    t = len(fit.frame_status)
    arrays = {k: v.detach().numpy().astype(np.float32) for k, v in fit.params.to_dict().items() if k != "betas"}
    arrays.update(camera_K=fit.camera.K.numpy(), camera_R=fit.camera.R.numpy(), camera_t=fit.camera.t.numpy())
    arrays = {k: np.broadcast_to(v, (t, *v.shape[1:])).astype(np.float32) for k, v in arrays.items()}
    return FittedClip(arrays, fit.params.betas.detach().numpy().reshape(-1).astype(np.float32),
                      fit.static_offsets.detach().numpy().astype(np.float32), int(clip.track.crops.shape[1]),
                      source, fit.dynamic_offsets.detach().numpy().astype(np.float32))


def load_fitted(path: str | Path) -> FittedClip:
    """A ``fit.npz`` (or its folder) or a synthetic corpus clip ``.npz``."""
    path = Path(path)
    if path.is_dir():
        path = path / "fit.npz"
    if not path.is_file():
        raise FileNotFoundError(f"no fitted clip at {path} (a fit.npz or a corpus clips/<id>.npz)")
    with np.load(path, allow_pickle=False) as z:
        a = {k: z[k] for k in z.files}
    t = a["expression"].shape[0]
    arrays = {k: np.asarray(a[k], np.float32).reshape(t, 3) if k != "expression" else np.asarray(a[k], np.float32)
              for k in PER_FRAME if k in a}
    for k in PER_FRAME:
        arrays.setdefault(k, np.zeros((t, 3), np.float32))
    for k, shape in (("camera_K", (3, 3)), ("camera_R", (3, 3)), ("camera_t", (3,))):
        v = np.asarray(a[k], np.float32)
        arrays[k] = np.broadcast_to(v.reshape(-1, *shape), (t, *shape)).copy()
    if "betas" in a:                                       # expportrait fit
        betas, static = a["betas"].reshape(-1), a["static_offsets"]
    else:                                                  # synthetic corpus clip
        ident = path.parent.parent / "identities" / f"{path.stem.split('_')[0]}.npz"
        if not ident.is_file():
            raise FileNotFoundError(f"{path} has no β: expected its identity file {ident}")
        with np.load(ident, allow_pickle=False) as z:
            betas, static = z["betas"], z["static_offsets"]
    size = int(a["image_size"][0]) if "image_size" in a else int(round(2 * arrays["camera_K"][0, 0, 2] + 1))
    return FittedClip(arrays, np.asarray(betas, np.float32), np.asarray(static, np.float32), size, str(path))


def transfer(driver: FittedClip, target: FittedClip, head, model=None, mode: str = "both", edit=None,
             target_frame: int = 0, camera_motion: bool = True) -> dict:
    """The target's per-frame head: HeadParams, Δg, Δf (T, N_face, 3) and cameras."""
    import torch

    from models.render.camera import Camera
    from models.transfer.edit import ExpressionEditor
    from models.transfer.inputs import head_params, neutral_inputs
    from models.transfer.retarget import EYE_JOINTS, POSE_JOINTS, retarget_camera, retarget_pose

    if mode not in ("both", "expression", "pose"):
        raise ValueError(f"mode {mode!r}: use both, expression or pose")
    t = driver.num_frames
    ref = target.frame(target_frame)
    tt = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.float32)
    rep = lambda x: np.broadcast_to(x, (t, *np.shape(x))).copy()
    arrays = {}
    if mode in ("both", "expression"):
        expr, jaw = tt(driver.arrays["expression"]), tt(driver.arrays["jaw_pose"])
        if edit is not None and not edit.is_identity:
            expr, jaw = ExpressionEditor(head).apply(expr, jaw, edit)
    else:
        expr, jaw = tt(rep(ref["expression"])), tt(rep(ref["jaw_pose"]))
    arrays["expression"], arrays["jaw_pose"] = expr.numpy(), jaw.numpy()
    if mode in ("both", "pose"):
        pose = retarget_pose({k: tt(driver.arrays[k]) for k in POSE_JOINTS + EYE_JOINTS + ("transl",)},
                             {k: tt(ref[k]) for k in POSE_JOINTS + EYE_JOINTS + ("transl",)})
        arrays.update({k: v.numpy() for k, v in pose.items()})
        R, tr = retarget_camera(tt(driver.arrays["camera_R"]), tt(driver.arrays["camera_t"]),
                                tt(ref["camera_R"]), tt(ref["camera_t"]), camera_motion=camera_motion)
    else:
        arrays.update({k: rep(ref[k]) for k in POSE_JOINTS + EYE_JOINTS + ("transl",)})
        R, tr = tt(rep(ref["camera_R"])), tt(rep(ref["camera_t"]))
    params = head_params({**arrays, "betas": target.betas})
    static = tt(target.static_offsets)
    if model is not None:
        with torch.no_grad():
            neutral, static_face = neutral_inputs(head, params.betas, static[None])
            dynamic = model(expr[None], jaw[None], neutral, static_face)[0].float()
    else:
        dynamic = torch.zeros(t, head.num_face_vertices, 3)
    camera = Camera.from_matrices(tt(rep(ref["camera_K"])), R, tr, (target.image_size,) * 2)
    return {"params": params, "static_offsets": static, "dynamic_offsets": dynamic, "camera": camera}
