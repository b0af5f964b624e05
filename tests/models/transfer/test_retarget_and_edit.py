"""Head-pose retargeting and region edits."""
import numpy as np
import torch
from smplx.lbs import batch_rodrigues

from models.head.head_model import HeadParams
from models.transfer.edit import EditSpec, ExpressionEditor
from models.transfer.inputs import head_params
from models.transfer.retarget import EYE_JOINTS, POSE_JOINTS, retarget_camera, retarget_pose
from preprocessing.synthetic.motion import sample_clip_motion


def _rot(aa):
    return batch_rodrigues(aa.reshape(-1, 3))


def test_retargeting_a_clip_onto_its_own_identity_reproduces_it(head):
    rng = np.random.default_rng(0)
    motion = sample_clip_motion(rng, 12, 25.0)
    t = 12
    cam_R = torch.as_tensor(rng.normal(size=(t, 3, 3))).float()
    cam_R = torch.linalg.qr(cam_R)[0]
    clip = {**{k: np.asarray(v, np.float32) for k, v in vars(motion).items()},
            "transl": rng.normal(size=(t, 3)).astype(np.float32) * 0.01,
            "camera_R": cam_R.numpy(), "camera_t": rng.normal(size=(t, 3)).astype(np.float32)}
    betas = rng.normal(size=300).astype(np.float32) * 0.5
    static_np = rng.normal(size=(head.num_vertices, 3)).astype(np.float32) * 1e-3
    driver = {k: torch.as_tensor(clip[k]) for k in POSE_JOINTS + EYE_JOINTS + ("transl",)}
    pose = retarget_pose(driver, {k: v[0] for k, v in driver.items()})
    R, tr = retarget_camera(torch.as_tensor(clip["camera_R"]), torch.as_tensor(clip["camera_t"]),
                            torch.as_tensor(clip["camera_R"][0]), torch.as_tensor(clip["camera_t"][0]))
    assert torch.allclose(R, torch.as_tensor(clip["camera_R"]), atol=1e-5)
    assert torch.allclose(tr, torch.as_tensor(clip["camera_t"]), atol=1e-6)
    sm = {**clip, "betas": betas}
    original = head_params(sm)
    retargeted = head_params({**sm, **{k: v.numpy() for k, v in pose.items()}})
    static = torch.as_tensor(static_np)
    with torch.no_grad():
        a = head(original, static).vertices
        b = head(retargeted, static).vertices
    assert a.shape[0] == t
    assert (a - b).abs().max() < 1e-5                                   # metres


def test_retargeting_carries_the_drivers_relative_motion():
    g = torch.Generator().manual_seed(0)
    driver = {k: torch.randn(6, 3, generator=g) * 0.3 for k in POSE_JOINTS + EYE_JOINTS + ("transl",)}
    target_ref = {k: torch.randn(3, generator=g) * 0.3 for k in driver}
    pose = retarget_pose(driver, target_ref, driver_ref=2)
    for k in POSE_JOINTS:
        rel_t = _rot(pose[k]) @ _rot(target_ref[k]).mT.expand(6, 3, 3)
        rel_d = _rot(driver[k]) @ _rot(driver[k][2]).mT.expand(6, 3, 3)
        assert torch.allclose(rel_t, rel_d, atol=1e-5)
        assert torch.allclose(_rot(pose[k][2]), _rot(target_ref[k])[0], atol=1e-5)   # reference frame
    assert torch.allclose(pose["transl"] - target_ref["transl"], driver["transl"] - driver["transl"][2], atol=1e-6)
    # a fixed camera stays fixed
    R, t = retarget_camera(_rot(driver["head_pose"]), driver["transl"], torch.eye(3), torch.zeros(3),
                           camera_motion=False)
    assert torch.equal(R, torch.eye(3).expand(6, 3, 3)) and torch.equal(t, torch.zeros(6, 3))


def test_region_edit_scales_its_region_only(head):
    editor = ExpressionEditor(head)
    assert torch.allclose(editor.projection(EditSpec()), torch.eye(100), atol=1e-5)
    counts = editor.region_vertex_counts()
    assert all(counts[g] > 50 for g in ("mouth", "eyes", "brows"))
    expr = torch.zeros(1, 100)
    expr[0, [0, 1, 2, 3]] = torch.tensor([1.0, 0.8, 0.9, 0.7])          # mouth, smile, brows, blink
    jaw = torch.tensor([[0.2, 0.0, 0.0]])

    def displacement(e):
        params = HeadParams.zeros(1)
        params.expression = e
        with torch.no_grad():
            v = head.canonical(params) - head.canonical(HeadParams.zeros(1))
        return v[0, :, :]

    coarse = head.coarse_to_fine[head.expr_vertex_ids]              # fine ids of the moved coarse vertices
    region = np.array(editor.region)
    base = displacement(expr)[coarse].norm(dim=-1)
    e2, j2 = editor.apply(expr, jaw, EditSpec(mouth=0.0, brows=1.0, eyes=1.0, jaw=0.5))
    edited = displacement(e2)[coarse].norm(dim=-1)
    mouth, brows = torch.as_tensor(region == "mouth"), torch.as_tensor(region == "brows")
    assert edited[mouth].mean() < 0.35 * base[mouth].mean()
    assert abs(edited[brows].mean() / base[brows].mean() - 1) < 0.25
    assert torch.allclose(j2, jaw * 0.5)
