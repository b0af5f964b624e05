import numpy as np
import pytest
import torch
import trimesh

from models.head.topology import mesh_edges, uniform_laplacian, upsample


def test_level_zero_is_identity(synthetic_data):
    up = upsample(synthetic_data.f, synthetic_data.num_vertices, 0)
    assert up.num_vertices == synthetic_data.num_vertices
    np.testing.assert_array_equal(up.faces, synthetic_data.f)
    np.testing.assert_allclose(up.interpolate(synthetic_data.v_template), synthetic_data.v_template)


@pytest.mark.parametrize("levels", [1, 2])
def test_upsampled_vertices_lie_on_the_coarse_surface(synthetic_data, levels):
    v, f = synthetic_data.v_template.astype(np.float64), synthetic_data.f
    up = upsample(f, len(v), levels)
    n_edges = len(mesh_edges(f))
    if levels == 1:
        assert up.num_vertices == len(v) + n_edges
    assert len(up.faces) == len(f) * 4 ** levels
    assert (up.bary >= 0).all() and np.allclose(up.bary.sum(1), 1.0)
    np.testing.assert_array_equal(up.vertex_ids, f[up.face_idx])
    fine = up.interpolate(v)
    # Each fine vertex is in the plane of its coarse triangle, inside it.
    tri = v[f[up.face_idx]]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    assert np.abs(((fine - tri[:, 0]) * normal).sum(1)).max() < 1e-9
    np.testing.assert_allclose(fine[up.coarse_to_fine], v)
    mesh = trimesh.Trimesh(fine, up.faces, process=False)
    assert mesh.is_watertight and mesh.is_winding_consistent


def test_reordering_keeps_the_mesh(synthetic_data):
    v, f = synthetic_data.v_template.astype(np.float64), synthetic_data.f
    up = upsample(f, len(v), 1)
    order = np.random.default_rng(0).permutation(up.num_vertices)
    re = up.reordered(order)
    np.testing.assert_allclose(re.interpolate(v), up.interpolate(v)[order])
    a = np.sort(np.sort(up.interpolate(v)[up.faces].reshape(len(f) * 4, -1), 1), 0)
    b = np.sort(np.sort(re.interpolate(v)[re.faces].reshape(len(f) * 4, -1), 1), 0)
    np.testing.assert_allclose(a, b)


def test_uniform_laplacian(synthetic_data):
    n = synthetic_data.num_vertices
    lap = uniform_laplacian(synthetic_data.f, n)
    ones = torch.ones(n, 1)
    assert torch.sparse.mm(lap, ones).abs().max() < 1e-5           # constants are in the kernel
    v = torch.as_tensor(synthetic_data.v_template, dtype=torch.float32)
    assert torch.sparse.mm(lap, v).norm(dim=1).mean() < 0.002      # a smooth surface is near it


@pytest.mark.pytorch3d
def test_uniform_laplacian_matches_pytorch3d(synthetic_data):
    from pytorch3d.ops import laplacian
    n = synthetic_data.num_vertices
    ours = uniform_laplacian(synthetic_data.f, n).to_dense()
    edges = torch.as_tensor(mesh_edges(synthetic_data.f))
    ref = laplacian(torch.zeros(n, 3), edges).to_dense()
    torch.testing.assert_close(ours, ref)
