"""Head-pose retargeting: the driver's head and neck motion on the target.

Convention. Every pose is SMPL-X axis-angle, a joint's rotation relative to its parent
(global_orient: the body root in world space). Motion is taken relative to a reference frame
of each side (default: frame 0 of the driver; the target's reference is its portrait or the
frame it was fitted on):

    R_target,j(i) = [R_driver,j(i) · R_driver,j(ref)ᵀ] · R_target,j(ref)    for j in the
                    global orientation, neck, head and (optionally) eyes
    t_target(i)   = t_target(ref) + s · (t_driver(i) − t_driver(ref))       translation, s = 1

i.e. the driver's change since its reference, applied on the left (in the parent joint's
frame) to the target's reference pose. The result is seen through the target's camera: its
intrinsics and image size always; its extrinsics either fixed at the target's reference
(``camera_motion=False``) or moved as the driver's camera moved relative to the driver's
reference, E_t(i) = E_t(ref) · E_d(ref)⁻¹ · E_d(i) with E = [R | t] world -> camera
(``camera_motion=True``, default: a fitted clip's camera carries part of the head motion).
Retargeting a clip onto itself with the same reference reproduces it exactly.
"""
from __future__ import annotations

import numpy as np
import torch
from smplx.lbs import batch_rodrigues
from torch import Tensor

POSE_JOINTS = ("global_orient", "neck_pose", "head_pose")
EYE_JOINTS = ("leye_pose", "reye_pose")


def matrix_to_axis_angle(rot: Tensor) -> Tensor:
    """Rotation matrices (..., 3, 3) -> axis-angle (..., 3) (stable near 0 and π)."""
    from scipy.spatial.transform import Rotation
    flat = rot.detach().reshape(-1, 3, 3).cpu().double().numpy()
    aa = Rotation.from_matrix(flat).as_rotvec()
    return torch.as_tensor(aa, dtype=rot.dtype, device=rot.device).reshape(*rot.shape[:-2], 3)


def _rot(aa: Tensor) -> Tensor:
    return batch_rodrigues(aa.reshape(-1, 3)).reshape(*aa.shape[:-1], 3, 3)


def relative_rotation(driver: Tensor, driver_ref: Tensor, target_ref: Tensor) -> Tensor:
    """Axis-angle (T, 3): the driver's rotation change since its reference on the target."""
    r = _rot(driver) @ _rot(driver_ref).transpose(-1, -2) @ _rot(target_ref)
    return matrix_to_axis_angle(r)


def retarget_pose(driver: dict[str, Tensor], target_ref: dict[str, Tensor], driver_ref: int = 0,
                  eyes: bool = True, translation_scale: float = 1.0) -> dict[str, Tensor]:
    """Per-frame target pose (T, 3) for ``POSE_JOINTS`` (+ eyes) and ``transl``.

    ``driver``: (T, 3) tensors of a driver clip; ``target_ref``: (3,) tensors of the target's
    reference pose (missing joints count as zero)."""
    t = driver["head_pose"].shape[0]
    out = {}
    for name in POSE_JOINTS + (EYE_JOINTS if eyes else ()):
        ref = target_ref.get(name, torch.zeros(3)).to(driver[name]).reshape(1, 3).expand(t, 3)
        out[name] = relative_rotation(driver[name], driver[name][driver_ref].expand(t, 3), ref)
    tr = driver.get("transl", torch.zeros(t, 3))
    out["transl"] = target_ref.get("transl", torch.zeros(3)).to(tr).reshape(1, 3) + \
        translation_scale * (tr - tr[driver_ref])
    return out


def retarget_camera(driver_R: Tensor, driver_t: Tensor, target_R: Tensor, target_t: Tensor,
                    driver_ref: int = 0, camera_motion: bool = True) -> tuple[Tensor, Tensor]:
    """Target extrinsics (T, 3, 3), (T, 3) world -> camera: fixed at the target's reference
    (``target_R`` (3, 3), ``target_t`` (3,)) or moved as the driver's camera moved."""
    t = driver_R.shape[0]
    if not camera_motion:
        return target_R.expand(t, 3, 3).clone(), target_t.expand(t, 3).clone()
    e_d = _homogeneous(driver_R, driver_t)                          # (T, 4, 4)
    e_t_ref = _homogeneous(target_R[None], target_t[None])           # (1, 4, 4)
    e = e_t_ref @ torch.linalg.inv(e_d[driver_ref:driver_ref + 1]) @ e_d
    return e[:, :3, :3].contiguous(), e[:, :3, 3].contiguous()


def _homogeneous(r: Tensor, t: Tensor) -> Tensor:
    e = torch.zeros(r.shape[0], 4, 4, dtype=r.dtype, device=r.device)
    e[:, :3, :3], e[:, :3, 3], e[:, 3, 3] = r, t, 1.0
    return e


def as_tensors(arrays: dict, names) -> dict[str, Tensor]:
    """Float32 tensors of the named arrays that exist."""
    return {k: torch.as_tensor(np.asarray(arrays[k]), dtype=torch.float32) for k in names if k in arrays}
