import json

import av
import numpy as np
import pandas as pd
import pytest
import torch

from preprocessing.synthetic.identity import detail_coefficients
from preprocessing.synthetic.world import (SyntheticWorld, WorldConfig, driven_clip, generate_corpus,
                                           load_clip, load_identity, rerender_clip,
                                           true_dynamic_offsets)

CONFIG = WorldConfig(identities=3, clips_per_identity=2, frames=12, size=96, seed=7)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, synthetic_model_path):
    out = tmp_path_factory.mktemp("corpus")
    return generate_corpus(out, CONFIG, synthetic_model_path, keep_frames=True, progress=False)


@pytest.fixture(scope="module")
def world(synthetic_model_path):
    return SyntheticWorld(synthetic_model_path, CONFIG.subdivision)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))


def test_layout_manifest_and_splits(corpus):
    out = corpus.out
    m = pd.read_parquet(out / "manifest.parquet")
    assert len(m) == 6 and set(m["split"]) == {"train", "val", "test"}
    assert (m.groupby("identity_id")["split"].nunique() == 1).all()      # split by identity
    for row in m.itertuples():
        assert (out / row.video).is_file() and (out / row.ground_truth).is_file()
    meta = json.loads((out / "world.json").read_text())
    assert meta["version"] == 1 and len(meta["model_sha1"]) == 40
    arrays = np.load(out / "world_arrays.npz")
    assert arrays["face_vertex_ids"].size == meta["num_face_vertices"]


def test_ground_truth_rerenders_the_frames(corpus, world):
    for clip_id, raw in corpus.raw_frames.items():
        again = rerender_clip(world, corpus.out, clip_id)
        np.testing.assert_array_equal(again, raw)                         # exact on raw frames
        with av.open(str(corpus.out / "clips" / f"{clip_id}.mp4")) as c:
            decoded = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
        assert decoded.shape == raw.shape
        assert _psnr(decoded, raw) > 40.0                                 # and through H.264


def test_driven_clip_is_the_cross_truth(corpus, world):
    """A clip driving itself is the clip; another identity driven by it keeps its own frame-0 pose
    and camera at the driver's frame 0, takes the driver's expression and the Δf the world gives it,
    and renders at another size in the same (resized) cameras."""
    a, b = "id000_clip00", "id001_clip01"
    same = driven_clip(world, corpus.out, a, a)
    diff = np.abs(same.frames.astype(int) - corpus.raw_frames[a])
    assert (diff > 1).mean() < 1e-4 and diff.mean() < 0.01      # rotations round-trip in float32: an edge pixel
    cross = driven_clip(world, corpus.out, a, b, frames=[0, 5, 9])
    src, drv = load_clip(corpus.out, a), load_clip(corpus.out, b)
    assert cross.frames.shape == (3, CONFIG.size, CONFIG.size, 3)
    for k in ("head_pose", "neck_pose", "global_orient"):
        assert np.allclose(getattr(cross.params, k)[0].numpy(), src[k][0], atol=1e-5)
    assert np.allclose(cross.params.expression.numpy(), drv["expression"][[0, 5, 9]])
    assert np.allclose(cross.params.betas.numpy().ravel(), load_identity(corpus.out, "id000").betas)
    assert np.allclose(cross.dynamic_offsets.numpy(), true_dynamic_offsets(corpus.out, b, "id000")[[0, 5, 9]])
    assert np.allclose(cross.camera.R[0].numpy(), src["camera_R"][0], atol=1e-5)
    big = driven_clip(world, corpus.out, a, b, frames=[5], size=2 * CONFIG.size)
    assert big.frames.shape == (1, 2 * CONFIG.size, 2 * CONFIG.size, 3)
    assert np.allclose(big.camera.focal.numpy(), 2 * cross.camera.focal[1:2].numpy())


def test_landmarks_project_onto_the_visible_surface(corpus, world):
    """The depth under each inner-face landmark matches the landmark's own depth: it projects
    onto the visible surface (3x3 neighbourhood: at 96 px a rounded pixel beside the open
    mouth or a nose wing can fall on the surface behind)."""
    from models.render.conditions import render_conditions
    from preprocessing.synthetic.motion import ClipMotion
    from preprocessing.synthetic.world import clip_camera

    clip_id = sorted(corpus.raw_frames)[0]
    clip = load_clip(corpus.out, clip_id)
    ident = load_identity(corpus.out, clip_id.split("_")[0])
    params, static, dynamic, _ = world.head_inputs(ident, ClipMotion.from_arrays(clip))
    cam = clip_camera(clip)
    with torch.no_grad():
        out = world.head(params, static_offsets=static, dynamic_offsets=dynamic)
        maps = render_conditions(out.vertices, world.head.faces, cam)
    lm2d, lm3d = clip["landmarks_2d"], clip["landmarks_3d"]
    cam_pts = cam.to_camera(torch.as_tensor(lm3d)).numpy()
    errors = []
    for t in range(len(lm2d)):
        for k in range(17, 68):                                           # not the contour
            u, v = np.round(lm2d[t, k]).astype(int)
            patch = maps.depth[t, v - 1:v + 2, u - 1:u + 2].numpy()
            assert (patch > 0).any(), (t, k)                              # on the head
            errors.append(np.abs(patch[patch > 0] - cam_pts[t, k, 2]).min())
    assert np.median(errors) < 0.002 and np.percentile(errors, 95) < 0.008
    # Landmarks sit on the right features (image y grows downwards).
    lm = lm2d[0]
    assert lm[17:27, 1].mean() < lm[36:48, 1].mean() < lm[30, 1] < lm[48:68, 1].mean() < lm[8, 1]


def test_pairs_and_identity_dependent_dynamic_offsets(corpus):
    pairs = pd.read_parquet(corpus.out / "pairs.parquet")
    assert len(pairs) > 0 and (pairs["driver_identity_id"] != pairs["target_identity_id"]).all()
    row = pairs.iloc[0]
    own = true_dynamic_offsets(corpus.out, row.driver_clip_id, row.driver_identity_id)
    other = true_dynamic_offsets(corpus.out, row.driver_clip_id, row.target_identity_id)
    assert own.shape == other.shape and own.shape[0] == CONFIG.frames
    # Same expressions, different identity: a different Δf (not a copy), scaled by age.
    a = load_identity(corpus.out, row.driver_identity_id).age
    b = load_identity(corpus.out, row.target_identity_id).age
    ratio = np.abs(other).sum() / np.abs(own).sum()
    assert ratio == pytest.approx((0.3 + 1.7 * b) / (0.3 + 1.7 * a), rel=1e-3)   # depth ∝ 0.3 + 1.7 age
    assert detail_coefficients(np.zeros((2, 100)), np.zeros((2, 3))).max() == 0   # neutral: none


def test_age_is_visible_in_the_neutral_geometry(corpus, world):
    """The detail depth is a function of something a model can see in V_neutral: the
    under-eye bags that age adds to Δg (no other Δg field reaches there)."""
    ages, bags = [], []
    for i in sorted({c.split("_")[0] for c in corpus.raw_frames}):
        ident = load_identity(corpus.out, i)
        ages.append(ident.age)
        dz = [ident.static_offsets[np.argsort(np.linalg.norm(
                  world.rest.vertices - (eye + [0, -0.014, 0.01]), axis=1))[:20], 2].mean()
              for eye in world.rest.eye_centres]
        bags.append(np.mean(dz))
    assert np.corrcoef(ages, bags)[0, 1] > 0.99


def test_deterministic_by_seed(tmp_path, corpus, synthetic_model_path):
    small = WorldConfig(identities=1, clips_per_identity=1, frames=12, size=96, seed=CONFIG.seed)
    again = generate_corpus(tmp_path / "again", small, synthetic_model_path, progress=False)
    a = load_clip(again.out, "id000_clip00")
    b = load_clip(corpus.out, "id000_clip00")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    np.testing.assert_array_equal(load_identity(again.out, "id000").albedo,
                                  load_identity(corpus.out, "id000").albedo)
