import math

import numpy as np
import pytest
import torch
import trimesh

from models.render.camera import Camera, portrait_camera
from models.render.conditions import decode_normals, encode_normals, render_conditions, vertex_normals
from models.render.rasterizer import rasterize_pytorch3d, rasterize_torch


def _camera(size=96, fov=30.0):
    eye = torch.tensor([[0.0, 0.0, 0.0]])
    return Camera.look_at(eye, torch.tensor([[0.0, 0.0, -1.0]]), (size, size), fov_deg=fov)


def _sphere(centre=(0.0, 0.0, -1.0), radius=0.2, subdivisions=4):
    s = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    v = torch.tensor(s.vertices + np.array(centre), dtype=torch.float32)[None]
    return v, torch.tensor(s.faces, dtype=torch.long)


def _plane(z: float, tilt: float = 0.0, half: float = 1.0):
    """Two triangles facing +z (towards a camera at the origin looking down -z)."""
    p = torch.tensor([[-half, -half, 0], [half, -half, 0], [half, half, 0], [-half, half, 0]],
                     dtype=torch.float32)
    c, s = math.cos(tilt), math.sin(tilt)
    rot = torch.tensor([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=torch.float32)
    v = p @ rot.T + torch.tensor([0.0, 0.0, z])
    return v[None], torch.tensor([[0, 1, 2], [0, 2, 3]])


def _ray_sphere_normals(cam: Camera, centre, radius):
    """Exact camera-space normals of a sphere at every pixel centre (NaN off the sphere)."""
    h, w = cam.image_size
    j, i = torch.meshgrid(torch.arange(w, dtype=torch.float64), torch.arange(h, dtype=torch.float64), indexing="xy")
    f, pp = cam.focal[0].double(), cam.principal[0].double()
    d = torch.stack([(j - pp[0]) / f[0], (i - pp[1]) / f[1], torch.ones_like(j)], -1)
    d = d / d.norm(dim=-1, keepdim=True)
    c = (cam.R[0].double() @ torch.tensor(centre, dtype=torch.float64) + cam.t[0].double())
    b = (d * c).sum(-1)
    disc = b ** 2 - (c @ c - radius ** 2)
    t = b - disc.clamp(min=0).sqrt()
    n = (t[..., None] * d - c) / radius
    n[disc <= 0] = float("nan")
    return n


def test_normal_map_of_known_normals_decodes_back():
    cam = _camera()
    v, f = _sphere()
    maps = render_conditions(v, f, cam)
    decoded = decode_normals(maps.normal_rgb())[0].double()
    exact = _ray_sphere_normals(cam, (0.0, 0.0, -1.0), 0.2)
    both = (maps.silhouette[0] > 0) & ~torch.isnan(exact[..., 0])
    angle = torch.rad2deg(torch.acos((decoded[both] * exact[both]).sum(-1).clamp(-1, 1)))
    assert both.sum() > 1500
    assert angle.median() < 1.5 and torch.quantile(angle, 0.95) < 4.0
    # Facing the camera encodes to (128, 128, 255).
    centre = maps.normal_rgb()[0, 48, 48]
    assert centre.tolist() == pytest.approx([128, 128, 255], abs=2)


def test_encode_decode_round_trip():
    n = torch.nn.functional.normalize(torch.randn(1000, 3), dim=-1)
    back = decode_normals(encode_normals(n))
    assert torch.rad2deg(torch.acos((back * n).sum(-1).clamp(-1, 1))).max() < 0.7


def test_depth_of_planes():
    cam = _camera()
    v, f = _plane(-2.0)
    maps = render_conditions(v, f, cam)
    assert maps.silhouette.all()
    torch.testing.assert_close(maps.depth, torch.full_like(maps.depth, 2.0))
    # A tilted plane: depth along each pixel ray equals the analytic ray-plane distance.
    v, f = _plane(-2.0, tilt=0.5)
    maps = render_conditions(v, f, cam)
    h, w = cam.image_size
    j, i = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32), indexing="xy")
    x = (j - cam.principal[0, 0]) / cam.focal[0, 0]
    y = (i - cam.principal[0, 1]) / cam.focal[0, 1]
    vc = cam.to_camera(v)[0]
    normal = torch.cross(vc[1] - vc[0], vc[2] - vc[0], dim=0)
    z = (normal @ vc[0]) / (normal[0] * x + normal[1] * y + normal[2])
    mask = maps.silhouette[0] > 0
    torch.testing.assert_close(maps.depth[0][mask], z[mask], atol=1e-5, rtol=1e-5)


def test_backface_culling():
    cam = _camera()
    v, f = _plane(-2.0)
    away = f[:, [0, 2, 1]]
    assert render_conditions(v, away, cam).silhouette.sum() == 0
    assert render_conditions(v, away, cam, cull_backfaces=False).silhouette.all()


def test_gradients_flow_from_maps_to_vertices():
    cam = _camera(size=64)
    v, f = _sphere(subdivisions=3)
    v = v.clone().requires_grad_(True)
    maps = render_conditions(v, f, cam)
    weights = torch.randn(maps.normals.shape, generator=torch.Generator().manual_seed(0))
    loss = (maps.normals * weights).sum() + maps.depth.sum()
    loss.backward()
    assert torch.isfinite(v.grad).all()
    assert (v.grad.norm(dim=-1) > 0).sum() > 100


def test_depth_gradient_matches_finite_differences():
    cam = _camera(size=32)
    v, f = _plane(-2.0, tilt=0.3, half=0.3)
    v = v.double()
    cam = cam.to(torch.float64)

    def loss(verts):
        return render_conditions(verts, f, cam).depth.sum()

    x = v.clone().requires_grad_(True)
    loss(x).backward()
    eps = 1e-6
    for k in range(4):
        d = torch.zeros_like(v)
        d[0, k, 2] = eps
        fd = (loss(v + d) - loss(v - d)) / (2 * eps)
        assert float(x.grad[0, k, 2]) == pytest.approx(float(fd), rel=1e-3, abs=1e-6)


def test_vertex_normals_of_a_sphere_point_outwards():
    v, f = _sphere()
    n = vertex_normals(v, f)[0]
    radial = torch.nn.functional.normalize(v[0] - torch.tensor([0.0, 0.0, -1.0]), dim=-1)
    assert (n * radial).sum(-1).min() > 0.999


def test_head_maps(head):
    from models.head.head_model import HeadParams
    p = HeadParams.zeros(2)
    p.global_orient[1, 1] = 0.5
    out = head(p)
    maps = render_conditions(out.vertices, head.faces, portrait_camera((128, 128)), head.face_mask)
    assert maps.normals.shape == (2, 128, 128, 3) and maps.depth.shape == (2, 128, 128)
    face, sil = maps.face_mask > 0, maps.silhouette > 0
    assert (face <= sil).all() and face.sum() > 500
    assert torch.all(maps.depth[sil] > 0.7) and torch.all(maps.depth[~sil] == 0)
    rows = face[0].nonzero()[:, 0].float()
    assert rows.mean() < sil[0].nonzero()[:, 0].float().mean()     # the face is above the torso


@pytest.mark.pytorch3d
@pytest.mark.parametrize("scene", ["sphere", "head"])
def test_torch_rasterizer_agrees_with_pytorch3d(scene, head_coarse):
    if scene == "sphere":
        cam = _camera(size=64)
        v, f = _sphere(subdivisions=3)
    else:
        from models.head.head_model import HeadParams
        p = HeadParams.zeros(2)
        p.global_orient[1, 1] = 0.6
        p.jaw_pose[1, 0] = 0.3
        v, f = head_coarse(p).vertices, head_coarse.faces
        cam = portrait_camera((96, 96))
    cam = cam.expand(v.shape[0])
    vc = cam.to_camera(v)
    uvz = torch.cat([cam.project(vc), vc[..., 2:]], -1)
    ours = rasterize_torch(uvz, f, cam.image_size)
    ref = rasterize_pytorch3d(vc, f, cam.focal, cam.principal, cam.image_size)
    assert (ours == ref).float().mean() > 0.995
    assert ((ours >= 0) == (ref >= 0)).float().mean() > 0.998


def test_rasterizer_block_size_does_not_change_the_face_ids(monkeypatch):
    """Faces go through the z-buffer in blocks of MAX_CANDIDATES candidate pixels; blocks
    overlap in screen space (two spheres, one behind the other), and any block size must
    give the same face ids."""
    from models.render import rasterizer

    cam = _camera(64)
    near, faces = _sphere((0.05, 0.0, -1.0), 0.2, 3)
    far, _ = _sphere((-0.05, 0.0, -1.3), 0.3, 3)
    verts = torch.cat([far, near], 1)                    # the far sphere is rasterized first
    faces = torch.cat([faces, faces + far.shape[1]])
    uvz = torch.cat([cam.project(cam.to_camera(verts)), cam.to_camera(verts)[..., 2:]], -1)
    whole = rasterize_torch(uvz, faces, cam.image_size)
    monkeypatch.setattr(rasterizer, "MAX_CANDIDATES", 500)
    blocks = rasterize_torch(uvz, faces, cam.image_size)
    half = len(faces) // 2
    assert ((whole >= 0) & (whole < half)).any() and (whole >= half).any()   # both visible
    assert torch.equal(whole, blocks)
