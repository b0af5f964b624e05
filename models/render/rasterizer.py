"""Triangle rasterization to face ids, and differentiable attribute interpolation.

Two backends produce the same thing, a (T, H, W) map of visible face ids (-1: background):

- ``"torch"``: vectorized in PyTorch (each face's bounding box expanded to candidate pixels,
  edge-function test, a z-buffer by ``scatter_reduce``). Our CPU path: pytorch3d's CPU
  rasterizer manages ~0.3 frames/s at 256² on a 20k-face head on 2 cores (measured in
  ``benchmarks/head.py``), far too slow for fitting and preprocessing.
- ``"pytorch3d"``: pytorch3d's ``MeshRasterizer``, the reference and the fast path on GPUs.

Face ids are not differentiable; :func:`barycentrics` then recomputes perspective-correct
barycentric coordinates of each pixel centre from the projected vertices with autograd, so
any interpolated attribute (normals, depth, masks) has gradients with respect to the vertices
inside the silhouette (as in nvdiffrast without its antialiasing pass).
"""
from __future__ import annotations

import torch
from torch import Tensor

# Upper bound on candidate (face, pixel) pairs processed at once (memory ~ 60 B each): blocks
# of ~30 MB render 15-20 % faster than blocks of ~360 MB on this 2-core machine (measured).
MAX_CANDIDATES = 500_000


def gather_faces(values: Tensor, faces: Tensor) -> Tensor:
    """Per-corner values (T, F, 3, C) of per-vertex ``values`` (T, N, C)."""
    t, _, c = values.shape
    return values.index_select(1, faces.reshape(-1)).view(t, -1, 3, c)


def screen_area(tri: Tensor) -> Tensor:
    """Twice the signed screen area (T, F) of projected triangles (T, F, 3, >=2).

    Negative means front-facing (outward normal towards the camera) for triangles in front
    of the camera, with image v pointing down."""
    u, v = tri[..., 0], tri[..., 1]
    return (u[..., 1] - u[..., 0]) * (v[..., 2] - v[..., 0]) - (u[..., 2] - u[..., 0]) * (v[..., 1] - v[..., 0])


@torch.no_grad()
def rasterize_torch(uvz: Tensor, faces: Tensor, image_size: tuple[int, int],
                    cull_backfaces: bool = True, near: float = 1e-4) -> Tensor:
    """Face-id map (T, H, W) from screen vertices ``uvz`` (T, N, 3): pixel u, v and camera z."""
    t_frames = uvz.shape[0]
    h, w = image_size
    out = torch.full((t_frames * h * w,), -1, dtype=torch.long, device=uvz.device)
    tri = gather_faces(uvz, faces)                                       # (T, F, 3, 3)
    u, v, z = tri[..., 0], tri[..., 1], tri[..., 2]
    box = torch.stack([torch.ceil(u.amin(-1)).clamp(min=0), torch.ceil(v.amin(-1)).clamp(min=0),
                       torch.floor(u.amax(-1)).clamp(max=w - 1),
                       torch.floor(v.amax(-1)).clamp(max=h - 1)], -1)  # x0, y0, x1, y1
    area = screen_area(tri)
    ok = (z.amin(-1) > near) & (box[..., 2] >= box[..., 0]) & (box[..., 3] >= box[..., 1])
    ok &= (area < -1e-12) if cull_backfaces else (area.abs() > 1e-12)
    sel = ok.view(-1).nonzero(as_tuple=True)[0]
    if sel.numel() == 0:
        return out.view(t_frames, h, w)
    # Only faces that can cover a pixel centre go further.
    n_faces = faces.shape[0]
    fi_t, fi_f = torch.div(sel, n_faces, rounding_mode="floor"), sel % n_faces
    tri = tri.reshape(-1, 3, 3).index_select(0, sel)
    area = area.reshape(-1).index_select(0, sel)
    box = box.reshape(-1, 4).index_select(0, sel).long()
    counts = (box[:, 2] - box[:, 0] + 1) * (box[:, 3] - box[:, 1] + 1)
    bounds = torch.cumsum(counts, 0)
    zbuf = torch.full((t_frames * h * w,), -float("inf"), dtype=uvz.dtype, device=uvz.device)
    # Blocks of faces keep the candidate buffers bounded; the z-buffer spans all blocks.
    start = 0
    while start < len(counts):
        base = int(bounds[start - 1]) if start else 0
        end = int(torch.searchsorted(bounds, base + MAX_CANDIDATES, right=True))
        end = max(end, start + 1)
        sl = slice(start, end)
        _rasterize_faces(tri[sl], area[sl], box[sl], counts[sl], fi_t[sl], fi_f[sl], h, w,
                         out, zbuf)
        start = end
    return out.view(t_frames, h, w)


def _rasterize_faces(tri: Tensor, area: Tensor, box: Tensor, counts: Tensor, frame: Tensor,
                     face: Tensor, h: int, w: int, out: Tensor, zbuf: Tensor) -> None:
    """Rasterize M selected faces (tri (M, 3, 3) in u, v, z) into ``out`` and ``zbuf``
    (T*H*W each; zbuf holds 1/z of the face written in ``out``)."""
    u, v, z = tri[..., 0], tri[..., 1], tri[..., 2]
    # Edge functions normalized by the area: barycentric b_k = a_k * x + b_k * y + c_k.
    cols = []
    for k in range(3):
        i, j = (k + 1) % 3, (k + 2) % 3
        du, dv = u[:, j] - u[:, i], v[:, j] - v[:, i]
        cols += [-dv / area, du / area, (dv * u[:, i] - du * v[:, i]) / area]
    data = torch.stack(cols + [1.0 / z[:, 0], 1.0 / z[:, 1], 1.0 / z[:, 2]], -1)   # (M, 12)
    rep = torch.repeat_interleave(torch.arange(len(counts), device=tri.device), counts)
    local = torch.arange(rep.numel(), device=tri.device) - (torch.cumsum(counts, 0) - counts)[rep]
    bw = (box[:, 2] - box[:, 0] + 1)[rep]
    py = torch.div(local, bw, rounding_mode="floor")
    px = box[rep, 0] + (local - py * bw)
    py = box[rep, 1] + py
    d = data.index_select(0, rep)
    fx, fy = px.to(d.dtype), py.to(d.dtype)
    b0 = d[:, 0] * fx + d[:, 1] * fy + d[:, 2]
    b1 = d[:, 3] * fx + d[:, 4] * fy + d[:, 5]
    b2 = d[:, 6] * fx + d[:, 7] * fy + d[:, 8]
    inside = ((b0 >= 0) & (b1 >= 0) & (b2 >= 0)).nonzero(as_tuple=True)[0]
    zinv = (b0 * d[:, 9] + b1 * d[:, 10] + b2 * d[:, 11]).index_select(0, inside)
    pix = (frame.index_select(0, rep) * (h * w) + py * w + px).index_select(0, inside)
    rep = rep.index_select(0, inside)
    # z-buffer: the largest 1/z (nearest) wins; ties go to the larger face id (deterministic).
    before = zbuf[pix]
    zbuf.scatter_reduce_(0, pix, zinv, reduce="amax")
    win = zinv >= zbuf[pix]
    taken = pix[win & (zinv > before)]          # nearer than what earlier blocks wrote
    out[taken] = -1
    out.scatter_reduce_(0, pix[win], face[rep[win]], reduce="amax")


def rasterize_pytorch3d(verts_cam: Tensor, faces: Tensor, focal: Tensor, principal: Tensor,
                        image_size: tuple[int, int], cull_backfaces: bool = True) -> Tensor:
    """Face-id map (T, H, W) by pytorch3d's rasterizer, for camera-space vertices."""
    from pytorch3d.renderer import MeshRasterizer, RasterizationSettings
    from pytorch3d.structures import Meshes
    from pytorch3d.utils import cameras_from_opencv_projection

    t_frames = verts_cam.shape[0]
    h, w = image_size
    k = torch.zeros(t_frames, 3, 3, dtype=verts_cam.dtype, device=verts_cam.device)
    k[:, 0, 0], k[:, 1, 1] = focal[:, 0], focal[:, 1]
    # pytorch3d's conversion puts pixel centres at j + 0.5; ours (OpenCV) at j: shift by half.
    k[:, 0, 2], k[:, 1, 2] = principal[:, 0] + 0.5, principal[:, 1] + 0.5
    k[:, 2, 2] = 1
    eye = torch.eye(3, dtype=verts_cam.dtype, device=verts_cam.device).expand(t_frames, 3, 3)
    cams = cameras_from_opencv_projection(
        eye, torch.zeros(t_frames, 3, dtype=verts_cam.dtype, device=verts_cam.device), k,
        torch.tensor([[h, w]], device=verts_cam.device).expand(t_frames, 2))
    settings = RasterizationSettings(image_size=(h, w), blur_radius=0.0, faces_per_pixel=1,
                                     cull_backfaces=cull_backfaces)
    meshes = Meshes(verts=list(verts_cam.detach()), faces=[faces] * t_frames)
    with torch.no_grad():
        frags = MeshRasterizer(cameras=cams, raster_settings=settings)(meshes)
    p2f = frags.pix_to_face[..., 0]
    offset = (torch.arange(t_frames, device=p2f.device) * faces.shape[0]).view(-1, 1, 1)
    return torch.where(p2f >= 0, p2f - offset, p2f)


def interpolate(uvz: Tensor, attributes: Tensor, faces: Tensor,
                face_idx: Tensor) -> tuple[Tensor, Tensor]:
    """Interpolate per-vertex ``attributes`` (T, N, C) at covered pixel centres.

    Perspective-correct barycentrics are recomputed from ``uvz`` (T, N, 3: pixel u, v,
    camera z) with autograd, so the result is differentiable in both. Returns the image
    (T, H, W, C), 0 on background, and the (M,) flat indices of covered pixels.
    """
    t_frames, h, w = face_idx.shape
    n, c = attributes.shape[1], attributes.shape[2]
    flat = face_idx.reshape(-1)
    pixels = (flat >= 0).nonzero(as_tuple=True)[0]
    frame = torch.div(pixels, h * w, rounding_mode="floor")
    rem = pixels - frame * (h * w)
    py = torch.div(rem, w, rounding_mode="floor").to(uvz.dtype)
    px = (rem % w).to(uvz.dtype)
    rows = (frame[:, None] * n + faces.index_select(0, flat.index_select(0, pixels))).reshape(-1)
    corner = torch.cat([uvz, attributes], -1).reshape(t_frames * n, -1).index_select(0, rows)
    corner = corner.view(-1, 3, 3 + c)                                   # (M, 3, 3 + C)
    u, v, z = corner[..., 0], corner[..., 1], corner[..., 2]
    area = (u[:, 1] - u[:, 0]) * (v[:, 2] - v[:, 0]) - (u[:, 2] - u[:, 0]) * (v[:, 1] - v[:, 0])
    screen = []
    for k in range(3):
        i, j = (k + 1) % 3, (k + 2) % 3
        screen.append(((u[:, j] - u[:, i]) * (py - v[:, i]) - (v[:, j] - v[:, i]) * (px - u[:, i])) / area)
    persp = torch.stack(screen, 1) / z
    bary = persp / persp.sum(1, keepdim=True)
    vals = (corner[..., 3:] * bary[..., None]).sum(1)                    # (M, C)
    img = vals.new_zeros(t_frames * h * w, c).index_put((pixels,), vals)
    return img.view(t_frames, h, w, c), pixels
