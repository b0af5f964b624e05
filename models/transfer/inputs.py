"""The target-side inputs of the transfer module, computed with the head model."""
from __future__ import annotations

import torch
from torch import Tensor

from models.head.head_model import HeadParams, PersonalizedHead


@torch.no_grad()
def neutral_inputs(head: PersonalizedHead, betas: Tensor, static_offsets: Tensor) -> tuple[Tensor, Tensor]:
    """V_neutral = B(V(β)) + Δg and Δg, both on the face region: (B, N_face, 3) each.

    ``betas`` (B, 300), ``static_offsets`` (B, N_s, 3)."""
    b = betas.shape[0]
    params = HeadParams.zeros(b, dtype=betas.dtype, device=betas.device)
    params.betas = betas
    ids = head.face_vertex_ids
    neutral = head.canonical(params, static_offsets)[:, ids]
    return neutral.contiguous(), static_offsets[:, ids].contiguous()


@torch.no_grad()
def canonical_face(head: PersonalizedHead) -> Tensor:
    """The template's neutral face region (N_face, 3): β = 0, Δg = 0."""
    return head.canonical(HeadParams.zeros(1))[0, head.face_vertex_ids].contiguous()


def head_params(smplx: dict, frames: slice | None = None) -> HeadParams:
    """HeadParams from a shard's / clip's SMPL-X arrays (per frame (T, ...), ``betas`` (300,))."""
    f32 = lambda x: torch.as_tensor(x, dtype=torch.float32)
    sel = (lambda x: x[frames]) if frames is not None else (lambda x: x)
    expr = sel(f32(smplx["expression"]))
    t = expr.shape[0]
    get = lambda k: sel(f32(smplx[k])) if k in smplx else torch.zeros(t, 3)
    return HeadParams(betas=f32(smplx["betas"]).reshape(1, -1), expression=expr,
                      global_orient=get("global_orient"), neck_pose=get("neck_pose"),
                      head_pose=get("head_pose"), jaw_pose=get("jaw_pose"), leye_pose=get("leye_pose"),
                      reye_pose=get("reye_pose"), transl=get("transl"))


def scaled_camera(K: Tensor, R: Tensor, t: Tensor, size: int, image_size: int | None = None):
    """Cameras (T frames) of a square ``image_size``² image resized to ``size``²
    (:meth:`Camera.resized`); ``image_size`` None: read off the principal point, which sits at
    the image centre for crops and portrait cameras."""
    from models.render.camera import Camera
    K = torch.as_tensor(K, dtype=torch.float32)
    src = int(image_size or round(float(2 * K[0, 0, 2] + 1)))
    return Camera.from_matrices(K, torch.as_tensor(R, dtype=torch.float32),
                                torch.as_tensor(t, dtype=torch.float32), (src, src)).resized(size)


@torch.no_grad()
def render_normal_maps(head: PersonalizedHead, params: HeadParams, static_offsets: Tensor | None,
                       dynamic_offsets: Tensor | None, camera) -> Tensor:
    """Posed personalized head -> RGB-encoded normal maps (T, H, W, 3) uint8."""
    from models.render.conditions import render_conditions
    verts = head(params, static_offsets, dynamic_offsets).vertices.contiguous()
    return render_conditions(verts, head.faces, camera, head.face_mask).normal_rgb()
