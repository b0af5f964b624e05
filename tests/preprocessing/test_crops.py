"""Crops of a face near the frame border: a constant fill and a validity mask, not smeared
edge pixels; the fitter gives no weight to landmarks that fall outside the source frame."""
import numpy as np
import torch

from preprocessing.clip_fit import landmark_weights
from preprocessing.tracking import CROP_FILL, FaceTrack, TrackStatus, _cut, crop_validity


def test_border_crop_is_filled_and_masked():
    rng = np.random.default_rng(0)
    frame = rng.integers(1, 256, (60, 80, 3), dtype=np.uint8)      # no pixel equals the fill
    box = np.array([-20.0, 30.0, 40.0])                             # 20 px left of, 10 px below the frame
    crop = _cut(frame, box, 40)
    valid = crop_validity(box[None], (80, 60), 40)[0]
    assert valid[:, 20:].any() and not valid[:, :20].any()         # left half lies outside
    assert not valid[30:].any() and valid[:30, 20:].all()          # bottom quarter too
    assert (crop[~valid] == CROP_FILL).all()                        # constant fill, no streaks
    assert (crop[valid] != CROP_FILL).all()
    inner = crop[5:25, 25:35].astype(int)
    assert np.array_equal(inner, frame[35:55, 5:15].astype(int))   # 1:1 scale: the pixels themselves


def test_landmarks_outside_the_frame_get_no_weight():
    t, size = 2, 40
    valid = np.ones((t, size, size), bool)
    valid[:, :, :10] = False
    lm = np.full((t, 68, 2), 20.0, np.float32)
    lm[0, :5, 0] = 3.0                     # five points of frame 0 on the filled strip
    lm[1, 0] = np.nan                      # a missing point
    track = FaceTrack(TrackStatus.OK, crops=np.zeros((t, size, size, 3), np.uint8), valid=valid,
                      landmarks68=lm, detected=np.array([True, False]))
    w = landmark_weights(track)
    assert w.shape == (t, 68) and w.dtype == torch.float32
    assert (w[0, :5] == 0).all() and (w[0, 5:] == 1).all()
    assert (w[1] == 0).all()               # no landmarks in that frame


def test_crop_camera_projects_where_the_crop_samples_the_frame():
    """A point the full-frame camera sees at frame pixel x lands at the crop pixel u with
    x = x0 + u * side / size (how _cut samples), and the fov-based crop intrinsics agree."""
    import math

    from preprocessing.clip_fit import crop_camera_matrices, crop_intrinsics
    K = np.array([[150.0, 0, 63.5], [0, 150.0, 63.5], [0, 0, 1]], np.float32)
    boxes = np.array([[10.0, -5.0, 90.0], [30.0, 20.0, 60.0]])
    Kc = crop_camera_matrices(K, boxes, 256)
    points = np.array([[0.02, -0.03, 1.0], [-0.1, 0.05, 1.2]], np.float32)
    for k, box in zip(Kc, boxes):
        for p in points:
            x = (K @ p)[:2] / p[2]
            u = (k @ p)[:2] / p[2]
            assert np.allclose(box[:2] + u * box[2] / 256, x, atol=1e-3)
    f = 0.5 * 128 / math.tan(math.radians(20.0) / 2)
    K20 = np.array([[f, 0, 63.5], [0, f, 63.5], [0, 0, 1]], np.float32)
    assert np.allclose(crop_intrinsics(boxes, (128, 128), 256, 20.0).numpy(), crop_camera_matrices(K20, boxes, 256))


def test_frame_camera_undoes_the_crop():
    """frame_camera_matrices inverts crop_camera_matrices, and resizes as Camera.resized does."""
    import torch

    from models.render.camera import Camera
    from preprocessing.clip_fit import crop_camera_matrices, frame_camera_matrices
    K = np.array([[150.0, 0, 63.5], [0, 150.0, 63.5], [0, 0, 1]], np.float32)
    boxes = np.array([[10.0, -5.0, 90.0], [-30.0, -20.0, 190.0]])
    back = frame_camera_matrices(crop_camera_matrices(K, boxes, 256), boxes, 256, 128)
    assert np.allclose(back, K, atol=1e-4)
    small = frame_camera_matrices(crop_camera_matrices(K, boxes, 256), boxes, 256, 128, 32)
    cam = Camera.from_matrices(torch.as_tensor(np.stack([K, K])), torch.eye(3).expand(2, 3, 3), torch.zeros(2, 3),
                               (128, 128)).resized(32)
    assert np.allclose(small[:, [0, 1], [0, 1]], cam.focal.numpy(), atol=1e-4)
    assert np.allclose(small[:, [0, 1], [2, 2]], cam.principal.numpy(), atol=1e-4)
