"""Camera.resized: the one camera resize, with the pixel convention the frames are resized with."""
import numpy as np
import torch
import torch.nn.functional as F

from models.render.camera import Camera, portrait_camera


def test_resized_camera_sees_what_the_resized_image_shows():
    """A bright pixel at (u, v) of a 256² image, downsampled to 64² by the frame transform's
    interpolation, lands where the resized camera projects the same 3D point (half-pixel centres,
    within the blur's centroid precision), and a resize there and back is the identity."""
    cam = portrait_camera((256, 256))
    point = torch.tensor([[[0.03, 0.12, 0.05]]])
    uv = cam.project(cam.to_camera(point))[0, 0]
    small = cam.resized(64)
    uv_small = small.project(small.to_camera(point))[0, 0]
    torch.testing.assert_close(uv_small, (uv + 0.5) * 0.25 - 0.5)
    u, v = (int(round(float(x))) for x in uv)
    img = torch.zeros(1, 1, 256, 256)
    img[0, 0, v - 1:v + 3, u - 1:u + 3] = 1.0              # a 4x4 block centred on (u + 0.5, v + 0.5)
    down = F.interpolate(img, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)[0, 0]
    ys, xs = np.mgrid[0:64, 0:64]
    w = down.numpy() / down.sum().item()
    centroid = np.array([(w * xs).sum(), (w * ys).sum()])
    expected = (np.array([u + 0.5, v + 0.5]) + 0.5) * 0.25 - 0.5
    np.testing.assert_allclose(centroid, expected, atol=1e-3)
    back = small.resized(256)
    torch.testing.assert_close(back.K, cam.K)
    assert back.image_size == (256, 256) and cam.resized(256) is cam


def test_scaled_camera_is_the_resize():
    from models.transfer.inputs import scaled_camera
    cam = Camera.from_matrices(portrait_camera((128, 128)).K, torch.eye(3)[None], torch.zeros(1, 3), (128, 128))
    torch.testing.assert_close(scaled_camera(cam.K, cam.R, cam.t, 48).K, cam.resized(48).K)
