"""Condition maps of a head mesh: normals, depth, silhouette and face-region mask.

Normal maps are camera-space normals. Stored and shown RGB-encoded in the usual
"view space" convention of normal-map conditioning (x right, y up, z towards the viewer):
``rgb = (n_view * 0.5 + 0.5) * 255`` with ``n_view = (n_x, -n_y, -n_z)`` of the OpenCV
camera-space normal; a surface facing the camera is (128, 128, 255); background is 0.
Depth is camera z in scene units (0 on background).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .camera import Camera
from .rasterizer import gather_faces, interpolate, rasterize_pytorch3d, rasterize_torch

_TO_VIEW = torch.tensor([1.0, -1.0, -1.0])


@dataclass
class ConditionMaps:
    normals: Tensor      # (T, H, W, 3) unit camera-space normals (OpenCV frame), 0 on background
    depth: Tensor        # (T, H, W) camera z, 0 on background
    silhouette: Tensor   # (T, H, W) 1 where the mesh covers the pixel
    face_mask: Tensor    # (T, H, W) 1 on the face region
    face_idx: Tensor     # (T, H, W) visible face id, -1 on background
    albedo: Tensor | None = None   # (T, H, W, 3) interpolated vertex colours, when given

    def normal_rgb(self) -> Tensor:
        return encode_normals(self.normals, self.silhouette > 0)


def vertex_normals(verts: Tensor, faces: Tensor) -> Tensor:
    """Area-weighted vertex normals (T, N, 3) of a triangle mesh, differentiable."""
    t, n, _ = verts.shape
    tri = gather_faces(verts, faces)                                 # (T, F, 3, 3)
    fn = torch.cross(tri[:, :, 1] - tri[:, :, 0], tri[:, :, 2] - tri[:, :, 0], dim=-1)
    # Sum face normals onto vertices with a sparse (N, F) incidence matrix (vertex-major).
    vn = _incidence(faces, n, verts.dtype) @ fn.transpose(0, 1).reshape(faces.shape[0], t * 3)
    return torch.nn.functional.normalize(vn.view(n, t, 3).transpose(0, 1), dim=-1, eps=1e-12)


_INCIDENCE_CACHE: dict = {}


def _incidence(faces: Tensor, num_vertices: int, dtype: torch.dtype) -> Tensor:
    """Sparse (N, F) vertex-face incidence, cached per faces tensor (checked by identity
    through a weak reference, so freed and reused memory never returns a stale matrix)."""
    import weakref
    key = (id(faces), tuple(faces.shape), num_vertices, dtype, faces.device)
    hit = _INCIDENCE_CACHE.get(key)
    mat = hit[1] if hit is not None and hit[0]() is faces else None
    if mat is None:
        nf = faces.shape[0]
        cols = torch.arange(nf, device=faces.device).repeat_interleave(3)
        idx = torch.stack([faces.reshape(-1), cols])
        mat = torch.sparse_coo_tensor(idx, torch.ones(3 * nf, dtype=dtype, device=faces.device),
                                      (num_vertices, nf)).coalesce().to_sparse_csr()
        if len(_INCIDENCE_CACHE) > 8:
            _INCIDENCE_CACHE.clear()
        _INCIDENCE_CACHE[key] = (weakref.ref(faces), mat)
    return mat


def encode_normals(normals: Tensor, mask: Tensor | None = None) -> Tensor:
    """Camera-space (OpenCV) unit normals (..., 3) -> uint8 RGB in the view convention."""
    view = normals * _TO_VIEW.to(normals)
    rgb = ((view * 0.5 + 0.5) * 255.0).round().clamp(0, 255).to(torch.uint8)
    if mask is not None:
        rgb = rgb * mask[..., None].to(torch.uint8)
    return rgb


def decode_normals(rgb: Tensor | np.ndarray) -> Tensor:
    """uint8 RGB normal map -> unit camera-space (OpenCV) normals; background (0) -> 0."""
    rgb = torch.as_tensor(rgb)
    view = rgb.float() / 255.0 * 2.0 - 1.0
    n = torch.nn.functional.normalize(view * _TO_VIEW, dim=-1, eps=1e-12)
    return n * (rgb.sum(-1, keepdim=True) > 0)


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "pytorch3d" if device.type == "cuda" and _has_pytorch3d() else "torch"
    if backend not in ("torch", "pytorch3d"):
        raise ValueError(f"unknown render backend {backend!r}: use auto, torch or pytorch3d")
    return backend


def _has_pytorch3d() -> bool:
    import importlib.util
    return importlib.util.find_spec("pytorch3d") is not None


def render_conditions(vertices: Tensor, faces: Tensor, camera: Camera,
                      face_vertex_mask: Tensor | None = None, backend: str = "auto",
                      cull_backfaces: bool = True,
                      vertex_colors: Tensor | None = None) -> ConditionMaps:
    """Render condition maps of a mesh for T frames.

    ``vertices`` (T, N, 3) in world space; ``faces`` (F, 3); ``camera`` with T frames (or 1);
    ``face_vertex_mask`` (N,) marks the face region; ``vertex_colors`` (N, 3) or (T, N, 3)
    are interpolated to ``albedo``. Normals and depth are differentiable with respect to the
    vertices.
    """
    t_frames = vertices.shape[0]
    camera = camera.expand(t_frames)
    h, w = camera.image_size
    verts_cam = camera.to_camera(vertices)
    uvz = torch.cat([camera.project(verts_cam), verts_cam[..., 2:]], -1)
    if resolve_backend(backend, vertices.device) == "pytorch3d":
        face_idx = rasterize_pytorch3d(verts_cam, faces, camera.focal, camera.principal,
                                       (h, w), cull_backfaces)
    else:
        face_idx = rasterize_torch(uvz.detach(), faces, (h, w), cull_backfaces)
    normals = vertex_normals(verts_cam, faces)
    attrs = [normals, verts_cam[..., 2:]]
    if face_vertex_mask is not None:
        attrs.append(face_vertex_mask.to(vertices.dtype).view(1, -1, 1).expand(t_frames, -1, 1))
    if vertex_colors is not None:
        attrs.append(vertex_colors.to(vertices.dtype).reshape(-1, vertices.shape[1], 3).expand(t_frames, -1, -1))
    maps, _ = interpolate(uvz, torch.cat(attrs, -1), faces, face_idx)
    sil = (face_idx >= 0).to(vertices.dtype)
    n = torch.nn.functional.normalize(maps[..., :3], dim=-1, eps=1e-12) * sil[..., None]
    face = (maps[..., 4] > 0.5).to(vertices.dtype) if face_vertex_mask is not None else torch.zeros_like(sil)
    albedo = maps[..., -3:] if vertex_colors is not None else None
    return ConditionMaps(normals=n, depth=maps[..., 3], silhouette=sil, face_mask=face,
                         face_idx=face_idx, albedo=albedo)
