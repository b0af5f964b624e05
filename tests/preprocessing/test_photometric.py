"""The photometric stage: the shading model's derivatives, the linearization the solver uses,
the separation of a wrinkle into Δf (not ψ), and device placement."""
import numpy as np
import pytest
import torch

from models.head.head_model import HeadParams
from models.render.conditions import render_conditions, vertex_normals
from models.render.shading import Lighting, shade
from preprocessing.fitting import FitConfig, Fitter, FitInputs
from preprocessing.photometric import PhotometricSolver, sh_basis, sh_basis_jacobian, shade_vertices
from preprocessing.synthetic.world import SyntheticWorld

pytestmark = pytest.mark.usefixtures("one_torch_thread")   # restored after the module


@pytest.fixture(scope="module")
def world(synthetic_model_path):
    return SyntheticWorld(synthetic_model_path, 1)


def test_shading_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    albedo = torch.rand(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    light = torch.randn(2, 9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    normals = torch.randn(2, 5, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(shade_vertices, (albedo, light, normals))
    # The analytic SH Jacobian the solver linearizes with equals autograd's.
    n = torch.nn.functional.normalize(torch.randn(7, 3, generator=g, dtype=torch.float64), dim=-1)
    auto = torch.autograd.functional.jacobian(lambda x: sh_basis(x).sum(0), n)      # (9, 7, 3)
    torch.testing.assert_close(sh_basis_jacobian(n), auto.permute(1, 0, 2))


def test_linearized_shading_matches_finite_differences(world):
    """δI = -(∂I/∂n) R (G h): the solver's linear model against re-rendered vertex normals
    of the displaced posed mesh (a smooth 0.1 mm height field on the face)."""
    head = world.head
    params = HeadParams.zeros(2)
    params.head_pose[1, 1] = 0.3
    params.expression[1, 0] = 1.0
    solver = PhotometricSolver(head)
    base, rots = head.offset_map(params)
    _, n_can, g = solver.neutral_frame(params.betas, None)
    ids = head.face_vertex_ids
    p = head.neutral(params.betas)[0, ids]
    h = 0.1 * torch.sin(p[:, 1] * 2 * np.pi / 0.012)[None].expand(2, -1)          # mm
    disp = (rots[:, ids] @ n_can[None, :, :, None])[..., 0]
    moved = base.clone()
    moved[:, ids] += disp * h[..., None] * 1e-3
    n0 = vertex_normals(base, head.faces)[:, ids]
    n1 = vertex_normals(moved, head.faces)[:, ids]
    light = torch.randn(2, 9, 3, generator=torch.Generator().manual_seed(1)) * 0.3
    light[:, 0] += 2.0
    albedo = torch.full((len(ids), 3), 0.6)
    r_cam = rots[:, ids]                                     # world frame (camera = identity)
    j, _, _ = solver._linear_system(torch.zeros(2, len(ids), 3), n0, light, albedo, torch.ones(2, len(ids)), r_cam)
    gh = (g @ h.T).T.reshape(2, -1, 3)
    predicted = (j @ gh[..., None])[..., 0]
    actual = shade_vertices(albedo, light, n1) - shade_vertices(albedo, light, n0)
    # Interior vertices (a full one-ring in the face region).
    inner = torch.bincount(torch.searchsorted(ids, head.faces[torch.isin(head.faces, ids).all(1)].reshape(-1)),
                           minlength=len(ids)) >= 6
    rel = (predicted - actual)[:, inner].norm() / actual[:, inner].norm()
    assert rel < 0.25, float(rel)


def _wrinkle_clip(world, size=128, frames=4):
    """A clip whose only change over time is a forehead groove (frames 2 and 3), rendered
    with the world's shading; returns the frames, true landmarks, camera and the true Δf."""
    head = world.head
    rng = np.random.default_rng(0)
    ident = world.identity("w", rng)
    params = HeadParams.zeros(frames)
    params.betas = torch.as_tensor(ident.betas, dtype=torch.float32)[None]
    ids = head.face_vertex_ids
    with torch.no_grad():
        neutral = head.neutral(params.betas)[0]
        n = vertex_normals(neutral[None], head.faces)[0, ids]
        lm = head(HeadParams.zeros(1)).landmarks[0]
    p = neutral[ids]
    brow = lm[17:27, 1].mean()
    groove = torch.exp(-0.5 * ((p[:, 1] - brow - 0.025) / 0.005) ** 2) * (p[:, 0].abs() < 0.04) * (p[:, 2] > 0.05)
    dyn = torch.zeros(frames, len(ids), 3)
    dyn[2:] = -0.0008 * groove[:, None] * n
    camera = world.camera(type("M", (), {"camera_offset": np.zeros((frames, 3), np.float32)})(), size, 0.75, 22.0)
    light = Lighting(ambient=torch.tensor([0.45] * 3), diffuse=torch.tensor([0.65] * 3),
                     direction=torch.nn.functional.normalize(torch.tensor([0.3, -0.6, -1.0]), dim=0))
    with torch.no_grad():
        out = head(params, torch.as_tensor(ident.static_offsets), dyn)
        maps = render_conditions(out.vertices, head.faces, camera, head.face_mask,
                                 vertex_colors=torch.full((head.num_vertices, 3), 0.7))
        rgb = shade(maps, light, torch.tensor([0.3, 0.35, 0.4]))
        lm2d = camera.project(camera.to_camera(out.landmarks))
    return (rgb * 255).round().to(torch.uint8), lm2d, camera, dyn - dyn.mean(0), torch.as_tensor(ident.static_offsets)


def test_a_wrinkle_goes_to_dynamic_offsets_not_to_expression(world):
    """Four frames, identical but for a forehead groove in the last two: ψ stays put, Δf
    carries the groove (right sign in every frame, concentrated on the groove) and lowers the
    photometric residual of every frame. Priors at the solver's base strength (the job's
    default is stronger, for its misregistered meshes) still shrink the depth: this checks
    where the groove goes, not how deep."""
    frames, lm2d, camera, true_dyn, static = _wrinkle_clip(world)
    cfg = FitConfig(iters_rigid=30, iters_expression=80, photo_regularization=1.0, photometric=True)
    inputs = FitInputs(landmarks=lm2d, image_size=(128, 128), K=camera.K, images=frames)
    fit = Fitter(world.head, cfg).fit(inputs, static_offsets=static)
    psi = fit.params.expression
    assert (psi[2:].mean(0) - psi[:2].mean(0)).abs().max() < 0.05
    region = true_dyn.norm(dim=-1).amax(0) > 1e-4
    direction = torch.nn.functional.normalize(true_dyn[3, region], dim=-1)
    fitted = (fit.dynamic_offsets[:, region] * direction).sum(-1).mean(1)
    truth = (true_dyn[:, region] * direction).sum(-1).mean(1)
    assert (torch.sign(fitted) == torch.sign(truth)).all(), (fitted, truth)
    inside = fit.dynamic_offsets[:, region].norm(dim=-1).mean()
    outside = fit.dynamic_offsets[:, ~region].norm(dim=-1).mean()
    assert inside > 3 * outside, (float(inside), float(outside))
    res, res0 = fit.qc["photometric_residual"], fit.qc["photometric_residual_no_dynamic"]
    assert res.shape == (4,) and (res < res0).all()


def test_device_placement_cpu(world):
    cfg = FitConfig(iters_rigid=2, iters_expression=2, device="cpu", photometric=False)
    fitter = Fitter(world.head, cfg)
    assert fitter.device.type == "cpu" and fitter.head is world.head
    assert FitConfig().resolved_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_placement_cuda(world):
    frames, lm2d, camera, _, static = _wrinkle_clip(world, frames=2)
    fitter = Fitter(world.head, FitConfig(iters_rigid=5, iters_expression=5, device="cuda", photometric=True))
    assert next(iter(fitter.head.buffers())).device.type == "cuda"
    assert world.head.faces.device.type == "cpu"            # the caller's head is not moved
    fit = fitter.fit(FitInputs(landmarks=lm2d, image_size=(128, 128), K=camera.K, images=frames),
                     static_offsets=static)
    assert fit.dynamic_offsets.device.type == "cpu" and fit.params.expression.device.type == "cpu"
    assert np.isfinite(fit.qc["photometric_residual"]).all()


def test_stage_config_device_setting():
    from preprocessing.clip_records import StageConfig
    assert StageConfig(fit={"device": "cpu"}).fit == {"device": "cpu"}
    with pytest.raises(ValueError, match="device"):
        StageConfig(fit={"device": "tpu"})
