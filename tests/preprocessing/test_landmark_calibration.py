"""The landmark embedding: calibration recovers known surface points, the file round-trips and
is refused for another model. (The MediaPipe calibration itself is ``main``; its effect is
measured by ``benchmarks/fitting.py``.)"""
import numpy as np
import pytest
import torch

from models.head.head_model import HeadParams
from models.render.camera import Camera
from preprocessing.landmark_calibration import Observation, calibrate
from preprocessing.landmark_embedding import LandmarkEmbedding, model_key, resolve_embedding

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _observations(head, faces, bary, clips=3, frames=8, noise_px=0.3):
    """Clips of random poses and expressions whose 'detections' are the projections of the
    sub-mesh points (faces, bary) plus pixel noise."""
    g = torch.Generator().manual_seed(0)
    K = torch.tensor([[600.0, 0, 128], [0, 600.0, 128], [0, 0, 1]])
    obs = []
    for _ in range(clips):
        p = HeadParams.zeros(frames)
        p.betas = torch.randn(1, 300, generator=g) * 0.5
        p.expression = torch.randn(frames, 100, generator=g) * 0.5
        p.head_pose = torch.randn(frames, 3, generator=g) * 0.25
        with torch.no_grad():
            v = head(p).vertices
        v = v - head(HeadParams.zeros(1)).vertices[:, head.face_vertex_ids].mean(1, keepdim=True)
        v = v * torch.tensor([1.0, -1.0, -1.0]) + torch.tensor([0.0, 0.0, 1.2])   # camera looks at the face
        tri = head.lmk_face_vertices[faces]
        pts = (v[:, tri] * bary[None, :, :, None]).sum(2)
        uv = pts @ K.T
        uv = uv[..., :2] / uv[..., 2:]
        det = uv + torch.randn(uv.shape, generator=g) * noise_px
        det[0, 5] = float("nan")                                             # a missed point
        camera = Camera.from_matrices(K.expand(frames, 3, 3), torch.eye(3).expand(frames, 3, 3), torch.zeros(frames, 3),
                                      (256, 256))
        obs.append(Observation(vertices_cam=v.contiguous(), camera=camera, detected=det,
                               face_width=torch.full((frames,), 100.0),
                               model_points=uv))
    return obs


def test_calibration_recovers_known_surface_points(synthetic_data, head):
    from preprocessing.landmark_calibration import _candidate_faces
    g = torch.Generator().manual_seed(1)
    cand = _candidate_faces(head)
    faces = cand[torch.randint(len(cand), (68,), generator=g)]
    bary = torch.distributions.Dirichlet(torch.ones(3)).sample((68,))
    obs = _observations(head, faces, bary)
    emb = calibrate(head, obs, synthetic_data)
    assert emb.faces.shape == (68,) and emb.bary.shape == (68, 3) and emb.frames == 24
    np.testing.assert_allclose(emb.bary.sum(1), 1.0, atol=1e-5)
    # the recovered points lie where the true ones are (on the rest mesh), within a few mm
    rest = head(HeadParams.zeros(1)).vertices[0]
    sub = {int(f): i for i, f in enumerate(head.submesh_face_ids)}
    found = torch.tensor([sub[int(f)] for f in emb.faces])
    point = lambda f, b: (rest[head.lmk_face_vertices[f]] * torch.as_tensor(b)[:, :, None]).sum(1)
    err_mm = (point(found, emb.bary) - point(faces, bary)).norm(dim=-1) * 1000
    assert float(err_mm.median()) < 2.0 and float(err_mm.max()) < 6.0
    assert float(np.median(emb.residual_pct)) < 1.0                         # 0.3 px noise on a 100 px face


def test_embedding_file_round_trip_and_model_check(synthetic_data, tmp_path):
    emb = LandmarkEmbedding(faces=np.arange(68), bary=np.full((68, 3), 1 / 3, np.float32),
                            model_key=model_key(synthetic_data), residual_pct=np.ones(68),
                            model_residual_pct=np.ones(68), frames=10)
    path = emb.save(tmp_path)
    assert path.name == f"mediapipe_ibug68_{emb.model_key}.npz"
    back = resolve_embedding(str(path), synthetic_data)
    assert np.array_equal(back.faces, emb.faces) and back.digest() == emb.digest()
    assert resolve_embedding("none", synthetic_data) is None and resolve_embedding(None, synthetic_data) is None
    other = LandmarkEmbedding(**{**emb.__dict__, "model_key": "0" * 16}).save(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="made for model"):
        resolve_embedding(str(other), synthetic_data)


def test_a_dense_embedding_gives_the_head_its_68_and_the_fitter_every_point(synthetic_data, tmp_path, monkeypatch):
    """A ``mediapipe478`` file: the head's 68 landmarks are its MEDIAPIPE_TO_IBUG68 rows, the fitter
    gets all 478 with weights on the 68's scale, ``auto`` takes it only where no 68-point file
    exists, and a file with the wrong number of points is refused."""
    from preprocessing import landmark_embedding as le
    from preprocessing.tracking import MEDIAPIPE_TO_IBUG68
    rng = np.random.default_rng(0)
    residual = rng.uniform(1, 5, 478).astype(np.float32)
    emb = LandmarkEmbedding(faces=rng.integers(0, 1000, 478), bary=np.full((478, 3), 1 / 3, np.float32),
                            model_key=model_key(synthetic_data), residual_pct=residual,
                            model_residual_pct=np.full(478, np.nan, np.float32), frames=5,
                            convention="mediapipe478")
    faces68, bary68 = emb.as_head_argument()
    assert np.array_equal(faces68, emb.faces[MEDIAPIPE_TO_IBUG68]) and bary68.shape == (68, 3)
    faces, bary, weights = emb.dense_points()
    assert faces.shape == (478,) and weights.shape == (478,)
    np.testing.assert_allclose(weights[MEDIAPIPE_TO_IBUG68], emb.weights())   # one scale for both
    assert LandmarkEmbedding(**{**emb.__dict__, "faces": faces68, "bary": bary68, "residual_pct": residual[:68],
                                "model_residual_pct": residual[:68],
                                "convention": "mediapipe_ibug68"}).dense_points() is None
    monkeypatch.setattr(le, "EMBEDDING_DIR", tmp_path)
    path = emb.save(tmp_path)
    back = le.resolve_embedding("auto", synthetic_data)
    assert back.convention == "mediapipe478" and back.digest() == emb.digest()
    assert np.isnan(back.model_residual_pct).all()
    LandmarkEmbedding(**{**emb.__dict__, "faces": faces68, "bary": bary68, "residual_pct": residual[:68],
                         "model_residual_pct": residual[:68], "convention": "mediapipe_ibug68"}).save(tmp_path)
    assert le.resolve_embedding("auto", synthetic_data).convention == "mediapipe_ibug68"
    assert le.resolve_embedding(str(path), synthetic_data).convention == "mediapipe478"    # by path
    with pytest.raises(ValueError, match="478 faces"):
        LandmarkEmbedding(**{**emb.__dict__, "faces": faces68})


def test_the_synthetic_model_has_its_calibrated_embedding(synthetic_data):
    """``auto`` finds the shipped file for the synthetic model (if the model's generator changes,
    rerun ``python -m preprocessing.landmark_calibration``); the contour, which MediaPipe places
    least consistently, weighs less than the inner points in the fit."""
    emb = resolve_embedding("auto", synthetic_data)
    assert emb is not None, "rerun: python -m preprocessing.landmark_calibration"
    w = emb.weights()
    assert w.shape == (68,) and w.min() >= 0.05 and w.max() <= 1.0
    assert np.median(w[:17]) < np.median(w[17:])
    from preprocessing.landmark_embedding import ibug68_rows
    rows = ibug68_rows(emb.convention)                                       # closer than the model's iBUG-68
    assert np.median(emb.residual_pct[rows]) < np.median(emb.model_residual_pct[rows])
