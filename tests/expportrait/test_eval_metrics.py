"""Each evaluation metric on known inputs, with real faces for the identity models."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from expportrait.evaluation.metrics import PSNR_CAP_DB, identity_drift, pixel_metrics, temporal_jitter

pytestmark = pytest.mark.usefixtures("one_torch_thread")   # restored after the module


@pytest.fixture(scope="module")
def carphone_frames(carphone):
    from expportrait.reenactment import read_frames
    return read_frames(carphone)[0]


@pytest.fixture(scope="module")
def astronaut():
    from skimage import data
    return data.astronaut()


def test_identical_videos_psnr_capped_l1_zero_ssim_one(carphone_frames):
    v = carphone_frames[:6]
    m = pixel_metrics(v, v.copy())
    assert m["psnr"] == PSNR_CAP_DB and m["psnr_capped"] is True
    assert m["l1"] == 0.0 and m["ssim"] == pytest.approx(1.0, abs=1e-4)
    noisy = np.clip(v.astype(int) + np.random.default_rng(0).integers(-20, 21, v.shape), 0, 255).astype(np.uint8)
    n = pixel_metrics(noisy, v)
    assert 15 < n["psnr"] < 40 and not n["psnr_capped"] and 0 < n["l1"] < 0.1 and n["ssim"] < 0.95


def test_pixel_metrics_reject_mismatched_shapes(carphone_frames):
    with pytest.raises(ValueError, match="differ in shape"):
        pixel_metrics(carphone_frames[:3], carphone_frames[:4])


def test_sface_csim_low_for_two_people_high_for_one(carphone_frames, astronaut):
    from expportrait.evaluation.identity import embedder
    sf = embedder("sface")
    same = sf.compare(sf.embed(carphone_frames[0]), sf.embed(carphone_frames[100]))
    other = sf.compare(sf.embed(carphone_frames[0]), sf.embed(astronaut))
    assert same > 0.5, same
    assert other < 0.3, other
    assert np.isnan(sf.compare(sf.embed(np.zeros((64, 64, 3), np.uint8)), sf.embed(astronaut)))  # no face: NaN


def test_dlib_second_opinion_distance(carphone_frames, astronaut):
    from expportrait.evaluation.identity import embedder
    d = embedder("dlib")
    same = d.compare(d.embed(carphone_frames[0]), d.embed(carphone_frames[100]))
    other = d.compare(d.embed(carphone_frames[0]), d.embed(astronaut))
    assert same < 0.6 < other, (same, other)


def test_jitter_flicker_scores_higher_than_steady_motion():
    t = np.arange(12)[:, None, None, None]
    ramp = np.broadcast_to((t * 10).astype(np.uint8), (12, 8, 8, 3)).copy()       # steady brightening
    flicker = ramp.copy()
    flicker[::2] += 30
    assert temporal_jitter(ramp)["jitter"] == 0.0
    j = temporal_jitter(flicker, reference=ramp)
    assert j["jitter"] > 0.1 and j["jitter_reference"] == 0.0


def test_identity_drift_slope_and_quarters():
    s = np.linspace(0.9, 0.5, 100)
    s[10] = np.nan                                                                  # a frame without a face
    d = identity_drift(s, fps=25)
    assert d["drift_per_s"] == pytest.approx(-0.4 / (99 / 25), rel=1e-3)
    assert d["drift_first_last"] > 0.25 and d["frames_with_face"] == 99
    assert identity_drift(np.full(10, 0.8))["drift_per_s"] == pytest.approx(0.0, abs=1e-12)


def test_lpips_skipped_without_backbone_and_zero_on_identical(tmp_path, carphone_frames):
    from expportrait.evaluation.lpips import _alexnet_features, lpips_score
    v = carphone_frames[:2]
    skipped = lpips_score(v, v, None)
    assert skipped["lpips"] is None and "skipped" in skipped["note"]
    torch.manual_seed(0)
    path = tmp_path / "alexnet.pth"          # torchvision's layout (random weights: no download here)
    torch.save({f"features.{k}": w for k, w in _alexnet_features().state_dict().items()}, path)
    assert lpips_score(v, v, path)["lpips"] == 0.0
    assert lpips_score(v, carphone_frames[60:62], path)["lpips"] > 0.0
    with pytest.raises(FileNotFoundError, match="backbone"):
        lpips_score(v, v, tmp_path / "missing.pth")


@pytest.mark.slow
def test_aed_apd_zero_for_the_same_video_and_larger_for_another(carphone_frames, head):
    from expportrait.evaluation.motion import aed_apd
    clip = np.ascontiguousarray(carphone_frames[:10])
    same, ref = aed_apd(clip, clip, head)
    assert same["fit_status"] == "ok" and same["aed"] < 1e-6 and same["apd_deg"] < 1e-3
    other, _ = aed_apd(np.ascontiguousarray(carphone_frames[60:70]), clip, head, ref)
    assert other["aed"] > 0.01 and other["apd_deg"] > 0.1


def test_apd_motion_ignores_a_constant_pose_offset_and_sees_a_still_video():
    """APD compares poses; APD motion compares each video's rotation since its first frame: a
    head performing the driver's motion from another starting pose has APD = the offset and APD
    motion 0; a still video's APD motion is the driver's own motion."""
    from scipy.spatial.transform import Rotation

    from expportrait.evaluation.motion import MotionFit, expression_pose_distance, head_rotation_in_camera
    t = 6
    yaw = np.zeros((t, 3))
    yaw[:, 1] = np.radians(np.linspace(0, 15, t))                 # the driver turns 15° in 5 steps
    eye = np.zeros((t, 3))
    driver_rot = head_rotation_in_camera(np.eye(3)[None], yaw, eye, eye)
    offset = Rotation.from_euler("x", 20, degrees=True).as_matrix()
    # the driver's camera-space rotations since its frame 0 applied to a start pitched 20°
    moved = MotionFit("ok", np.zeros((t, 50)), np.zeros((t, 3)), driver_rot @ offset)
    still = MotionFit("ok", np.zeros((t, 50)), np.zeros((t, 3)), np.repeat(offset[None], t, 0))
    driver = MotionFit("ok", np.zeros((t, 50)), np.zeros((t, 3)), driver_rot)
    d = expression_pose_distance(moved, driver)
    assert d["apd_motion_deg"] == pytest.approx(0, abs=1e-3) and d["apd_deg"] > 19
    s = expression_pose_distance(still, driver)
    assert s["apd_motion_deg"] == pytest.approx(np.mean(np.linspace(0, 15, t)[1:]), abs=1e-4)
    one = expression_pose_distance(MotionFit("ok", np.zeros((1, 50)), np.zeros((1, 3)), driver_rot[:1]), driver)
    assert one["apd_deg"] == pytest.approx(0, abs=1e-3) and np.isnan(one["apd_motion_deg"])
