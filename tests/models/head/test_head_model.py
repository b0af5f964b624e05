import numpy as np
import pytest
import smplx
import torch

from models.head.head_model import HeadConfig, HeadParams, center_dynamic_offsets
from models.head.smplx_file import ENV_VAR, HeadModelFileError


def _random_params(t: int, seed: int = 0, head_pose: bool = True) -> HeadParams:
    g = torch.Generator().manual_seed(seed)
    p = HeadParams.zeros(t)
    p.betas = torch.randn(1, 300, generator=g) * 0.7
    p.expression = torch.randn(t, 100, generator=g) * 0.8
    for name in ("global_orient", "neck_pose", "head_pose", "jaw_pose", "leye_pose", "reye_pose"):
        setattr(p, name, torch.randn(t, 3, generator=g) * 0.2)
    if not head_pose:
        p.head_pose.zero_()
    p.jaw_pose[:, 0] = p.jaw_pose[:, 0].abs()
    p.transl = torch.randn(t, 3, generator=g) * 0.1
    return p


def test_level_zero_matches_smplx(synthetic_model_path, head_coarse):
    t = 4
    p = _random_params(t, head_pose=False)
    ref = smplx.SMPLX(model_path=str(synthetic_model_path), num_betas=300, num_expression_coeffs=100,
                      use_pca=False, use_face_contour=True, batch_size=t)
    body = torch.zeros(t, 63)
    body[:, 33:36] = p.neck_pose                       # joint 12 (neck) in smplx's body_pose
    o = ref(betas=p.betas.expand(t, -1), expression=p.expression, global_orient=p.global_orient,
            body_pose=body, jaw_pose=p.jaw_pose, leye_pose=p.leye_pose, reye_pose=p.reye_pose,
            transl=p.transl)
    out = head_coarse(p)
    ours = out.vertices[:, head_coarse.coarse_to_fine]
    torch.testing.assert_close(ours, o.vertices[:, head_coarse.submesh_vertex_ids], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.joints, o.joints[:, :55], atol=1e-5, rtol=0)
    ref_lm = torch.cat([o.joints[:, -17:], o.joints[:, -68:-17]], 1)
    torch.testing.assert_close(out.landmarks, ref_lm, atol=1e-5, rtol=0)


def test_head_joint_pose_matches_smplx_body_pose(synthetic_model_path, head_coarse):
    p = _random_params(2)
    ref = smplx.SMPLX(model_path=str(synthetic_model_path), num_betas=300, num_expression_coeffs=100,
                      use_pca=False, batch_size=2)
    body = torch.zeros(2, 63)
    body[:, 33:36], body[:, 42:45] = p.neck_pose, p.head_pose   # joints 12 and 15
    o = ref(betas=p.betas.expand(2, -1), expression=p.expression, global_orient=p.global_orient,
            body_pose=body, jaw_pose=p.jaw_pose, leye_pose=p.leye_pose, reye_pose=p.reye_pose,
            transl=p.transl)
    out = head_coarse(p)
    torch.testing.assert_close(out.vertices[:, head_coarse.coarse_to_fine],
                               o.vertices[:, head_coarse.submesh_vertex_ids], atol=1e-5, rtol=0)


def test_batched_forward_is_per_frame(head):
    p = _random_params(5, seed=1)
    out = head(p)
    assert out.vertices.shape == (5, head.num_vertices, 3)
    assert out.landmarks.shape == (5, 68, 3) and out.joints.shape == (5, 55, 3)
    single = head(p.map(lambda x: x[2:3] if x.shape[0] == 5 else x))
    torch.testing.assert_close(out.vertices[2:3], single.vertices, atol=1e-6, rtol=0)
    assert head.faces.min() >= 0 and head.faces.max() < head.num_vertices


def test_fine_vertices_follow_skinning(head, head_coarse, synthetic_data):
    """Fine vertices carry the barycentric interpolation of their triangle's skinning
    weights, so posed they stay on the posed coarse surface: exactly where skinning is rigid,
    to second order where weights blend (skin-then-interpolate vs interpolate-then-skin)."""
    b = head.up_matrix_t.to_dense().T                 # (N_s, V_sub)
    coarse_w = torch.as_tensor(synthetic_data.weights[head.submesh_vertex_ids.numpy()])
    fine_w = (b @ coarse_w)[:, head.skin_joints]
    rigid = torch.zeros(head.num_vertices, dtype=torch.bool)
    for start, end, joint in head.skin_ranges:
        if joint >= 0:
            rigid[start:end] = True
            assert torch.allclose(fine_w[start:end, joint], torch.ones(end - start))
        else:
            torch.testing.assert_close(head.blend_weights, fine_w[start:end].T)
    p = _random_params(3, seed=2)
    fine = head(p).vertices
    coarse = head_coarse(p).vertices[:, head_coarse.coarse_to_fine]   # model order, sub-mesh
    err = (fine - torch.einsum("nv,tvc->tnc", b, coarse)).norm(dim=-1)
    assert err[:, rigid].max() < 1e-5
    assert err.max() < 3e-3


def test_dynamic_offsets_are_zero_outside_the_face(head):
    p = _random_params(3, seed=3)
    g = torch.Generator().manual_seed(0)
    delta_f = torch.randn(3, head.num_face_vertices, 3, generator=g) * 0.003
    base = head.canonical(p)
    with_f = head.canonical(p, dynamic_offsets=delta_f)
    diff = (with_f - base).norm(dim=-1)
    assert diff[:, ~head.face_mask].max() == 0
    assert diff[:, head.face_mask].min() > 0
    posed = (head(p, dynamic_offsets=delta_f).vertices - head(p).vertices).norm(dim=-1)
    assert posed[:, ~head.face_mask].max() < 1e-6


def test_face_region_is_the_front_of_the_face(head):
    rest = head.neutral(torch.zeros(1, 300))[0]
    face = rest[head.face_mask]
    assert 2000 < head.num_face_vertices < head.num_vertices // 2
    assert (face[:, 2] > 0).all()                       # in front of the ears
    assert face[:, 1].min() > 0.08 and face[:, 1].max() < 0.3


def test_offsets_are_canonical_and_rotate_with_the_head(head):
    p = HeadParams.zeros(1)
    p.global_orient[0, 1] = 0.7
    g = torch.Generator().manual_seed(1)
    delta_g = torch.randn(head.num_vertices, 3, generator=g) * 0.002
    moved = head(p, static_offsets=delta_g).vertices - head(p).vertices
    rot = torch.tensor([[np.cos(0.7), 0, np.sin(0.7)], [0, 1, 0], [-np.sin(0.7), 0, np.cos(0.7)]],
                       dtype=torch.float32)
    torch.testing.assert_close(moved[0], delta_g @ rot.T, atol=1e-6, rtol=0)
    # Per-frame static offsets equal the broadcast ones.
    p2 = HeadParams.zeros(2)
    a = head(p2, static_offsets=delta_g).vertices
    b = head(p2, static_offsets=delta_g[None].expand(2, -1, -1)).vertices
    torch.testing.assert_close(a, b)


def test_center_dynamic_offsets_is_zero_mean():
    x = torch.randn(7, 50, 3)
    c = center_dynamic_offsets(x)
    assert c.mean(0).abs().max() < 1e-6
    torch.testing.assert_close(c - c[0], x - x[0])


def test_forward_is_differentiable(head):
    p = _random_params(2, seed=4)
    p.expression.requires_grad_(True)
    p.betas.requires_grad_(True)
    delta_g = torch.zeros(head.num_vertices, 3, requires_grad=True)
    delta_f = torch.zeros(2, head.num_face_vertices, 3, requires_grad=True)
    out = head(p, static_offsets=delta_g, dynamic_offsets=delta_f)
    (out.vertices.square().sum() + out.landmarks.sum()).backward()
    for t in (p.expression, p.betas, delta_g, delta_f):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_laplacian_of_the_fine_mesh(head):
    lap = head.laplacian()
    assert lap.shape == (head.num_vertices, head.num_vertices)
    assert torch.sparse.mm(lap, torch.ones(head.num_vertices, 1)).abs().max() < 1e-5


@pytest.mark.parametrize("suffix", ["ply", "obj"])
def test_export_personalized_mesh(tmp_path, head, suffix):
    import trimesh
    verts = head.neutral(torch.zeros(1, 300))[0]
    path = tmp_path / f"head.{suffix}"
    head.to_trimesh(verts).export(path)
    back = trimesh.load(path, process=False)
    assert len(back.vertices) == head.num_vertices and len(back.faces) == len(head.faces)
    np.testing.assert_allclose(back.vertices, verts.numpy(), atol=1e-5)


def test_config_uses_env_var_and_reports_missing_file(tmp_path, monkeypatch, synthetic_model_path):
    monkeypatch.setenv(ENV_VAR, str(synthetic_model_path))
    assert HeadConfig(subdivision_levels=0).build().num_vertices == 10475
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(HeadModelFileError, match="SMPLX_NEUTRAL.npz"):
        HeadConfig().build()


def test_landmark_model_matches_the_full_forward(head):
    p = _random_params(4, seed=5)
    lm_head = head.landmark_model()
    landmarks, joints = lm_head(p)
    out = head(p)
    torch.testing.assert_close(landmarks, out.landmarks, atol=1e-5, rtol=0)
    torch.testing.assert_close(joints, out.joints, atol=1e-5, rtol=0)
    assert lm_head.num_vertices < 1000


def test_vertex_subset_model_matches_the_full_forward(head):
    p = _random_params(3, seed=7)
    ids = head.face_vertex_ids[::5]
    sub = head.vertex_subset_model(ids)
    torch.testing.assert_close(sub(p), head(p).vertices[:, ids], atol=1e-5, rtol=0)
    p.expression.requires_grad_(True)
    sub(p).sum().backward()                       # differentiable in the parameters
    assert p.expression.grad.abs().sum() > 0


def test_offset_map_is_exact(head):
    p = _random_params(3, seed=6)
    g = torch.Generator().manual_seed(2)
    delta = torch.randn(3, head.num_vertices, 3, generator=g) * 0.002
    base, rots = head.offset_map(p)
    mapped = base + (rots @ delta.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(mapped, head(p, static_offsets=delta).vertices, atol=1e-6, rtol=0)


def test_landmark_embedding_replaces_the_definitions_as_fixed_surface_points(synthetic_data, head):
    """An embedding of the model's own points (contour of the frontal bin) gives the model's
    landmarks where the contour is frontal, keeps the contour fixed on the surface under any
    yaw, and the fast landmark model agrees with the full forward."""
    from models.head.head_model import PersonalizedHead

    d = synthetic_data
    faces = np.concatenate([d.dynamic_lmk_faces_idx[0], d.lmk_faces_idx])
    bary = np.concatenate([d.dynamic_lmk_bary_coords[0], d.lmk_bary_coords])
    embedded = PersonalizedHead(d, subdivision_levels=1, landmark_embedding=(faces, bary))
    assert torch.equal(embedded.face_vertex_ids, head.face_vertex_ids)       # the region stays the model's
    p = _random_params(5, seed=9)
    out, ref = embedded(p), head(p)
    torch.testing.assert_close(out.vertices, ref.vertices)
    torch.testing.assert_close(out.landmarks[:, 17:], ref.landmarks[:, 17:])  # static points unchanged
    frontal = HeadParams.zeros(1)
    torch.testing.assert_close(embedded(frontal).landmarks, head(frontal).landmarks, atol=1e-6, rtol=0)
    # the contour is the frontal bin's surface point in every frame, whatever the yaw
    vids = embedded.lmk_face_vertices[embedded.contour_lmk_faces[0]]             # (17, 3)
    fixed = (out.vertices[:, vids] * embedded.contour_lmk_bary[0][None, :, :, None]).sum(2)
    torch.testing.assert_close(out.landmarks[:, :17], fixed, atol=1e-6, rtol=0)
    lm, _ = embedded.landmark_model()(p)
    torch.testing.assert_close(lm, out.landmarks, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="68 faces"):
        PersonalizedHead(d, landmark_embedding=(faces[:51], bary[:51]))
    with pytest.raises(ValueError, match="not faces of this model"):
        PersonalizedHead(d, landmark_embedding=(faces + len(d.f), bary))
    # any number of fixed surface points (a dense embedding's): the same points as the landmarks
    points = embedded.surface_points_model(faces, bary)
    torch.testing.assert_close(points(p), out.landmarks, atol=1e-5, rtol=0)
    many = embedded.surface_points_model(np.tile(faces, 7), np.tile(bary, (7, 1)))
    torch.testing.assert_close(many(p)[:, 68:136], out.landmarks, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="outside the head-and-torso region"):
        embedded.surface_points_model(faces + len(d.f), bary)
