"""Pinhole cameras in the OpenCV convention, batched over frames.

Camera space: x right, y down, z forward (into the scene). Image space: pixel (row i, col j)
has its centre at (u, v) = (j, i), as in OpenCV. ``R``, ``t`` map world to camera:
``x_cam = R @ x_world + t``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Camera:
    focal: Tensor        # (T, 2) fx, fy in pixels
    principal: Tensor    # (T, 2) cx, cy in pixels
    R: Tensor            # (T, 3, 3) world -> camera rotation
    t: Tensor            # (T, 3) world -> camera translation
    image_size: tuple[int, int]   # (H, W)

    @property
    def num_frames(self) -> int:
        return self.R.shape[0]

    @property
    def K(self) -> Tensor:
        """Intrinsic matrices (T, 3, 3)."""
        k = torch.zeros(self.num_frames, 3, 3, dtype=self.R.dtype, device=self.R.device)
        k[:, 0, 0], k[:, 1, 1] = self.focal[:, 0], self.focal[:, 1]
        k[:, 0, 2], k[:, 1, 2] = self.principal[:, 0], self.principal[:, 1]
        k[:, 2, 2] = 1.0
        return k

    def to_camera(self, points: Tensor) -> Tensor:
        """World points (T, N, 3) -> camera space (T, N, 3)."""
        return points @ self.R.transpose(1, 2) + self.t[:, None]

    def project(self, points_cam: Tensor) -> Tensor:
        """Camera-space points (T, N, 3) -> pixel coordinates (T, N, 2)."""
        z = points_cam[..., 2:3]
        return points_cam[..., :2] / z * self.focal[:, None] + self.principal[:, None]

    @classmethod
    def from_matrices(cls, K: Tensor, R: Tensor, t: Tensor, image_size: tuple[int, int]) -> "Camera":
        """From intrinsic matrices K (T, 3, 3) and world-to-camera R (T, 3, 3), t (T, 3)."""
        K, R, t = (torch.as_tensor(x) for x in (K, R, t))
        return cls(K[:, [0, 1], [0, 1]].clone(), K[:, [0, 1], [2, 2]].clone(), R, t, image_size)

    def resized(self, size: int | tuple[int, int]) -> "Camera":
        """The same cameras for the image resized to ``size`` (an int: square). Pixel centres
        sit at integers (module doc), so a pixel covers [u - ½, u + ½] and a resize by r maps
        u to (u + ½)·r − ½: the convention of ``cv2.resize`` and ``F.interpolate(...,
        align_corners=False)``, which resize the frames the cameras go with."""
        h, w = (size, size) if isinstance(size, int) else size
        if (h, w) == tuple(self.image_size):
            return self
        r = torch.tensor([w / self.image_size[1], h / self.image_size[0]], dtype=self.focal.dtype,
                         device=self.focal.device)
        return Camera(self.focal * r, (self.principal + 0.5) * r - 0.5, self.R, self.t, (h, w))

    def select(self, frames) -> "Camera":
        """The cameras of some frames (an index tensor or a slice)."""
        return Camera(self.focal[frames], self.principal[frames], self.R[frames], self.t[frames],
                      self.image_size)

    def expand(self, num_frames: int) -> "Camera":
        """Repeat a single-frame camera for ``num_frames`` frames."""
        if self.num_frames == num_frames:
            return self
        if self.num_frames != 1:
            raise ValueError(f"cannot expand a {self.num_frames}-frame camera to {num_frames}")
        e = lambda x: x.expand(num_frames, *x.shape[1:])
        return Camera(e(self.focal), e(self.principal), e(self.R), e(self.t), self.image_size)

    def to(self, *args, **kwargs) -> "Camera":
        return Camera(self.focal.to(*args, **kwargs), self.principal.to(*args, **kwargs),
                      self.R.to(*args, **kwargs), self.t.to(*args, **kwargs), self.image_size)

    @classmethod
    def look_at(cls, eye: Tensor, target: Tensor, image_size: tuple[int, int],
                fov_deg: float = 20.0, up: tuple[float, float, float] = (0.0, 1.0, 0.0)) -> "Camera":
        """Cameras at ``eye`` (T, 3) looking at ``target`` (T, 3), world y up, vertical FOV."""
        eye, target = torch.atleast_2d(eye), torch.atleast_2d(target)
        z = torch.nn.functional.normalize(target - eye, dim=-1)            # forward
        up_t = torch.tensor(up, dtype=eye.dtype, device=eye.device).expand_as(z)
        x = torch.nn.functional.normalize(torch.cross(-up_t, z, dim=-1), dim=-1)  # right
        y = torch.cross(z, x, dim=-1)                                        # down
        rot = torch.stack([x, y, z], 1)
        h, w = image_size
        f = 0.5 * h / math.tan(math.radians(fov_deg) / 2)
        n = eye.shape[0]
        focal = torch.tensor([f, f], dtype=eye.dtype, device=eye.device).expand(n, 2)
        principal = torch.tensor([(w - 1) / 2, (h - 1) / 2], dtype=eye.dtype,
                                 device=eye.device).expand(n, 2)
        trans = -(rot @ eye[..., None])[..., 0]
        return cls(focal.clone(), principal.clone(), rot, trans, image_size)


def portrait_camera(image_size: tuple[int, int] = (256, 256), distance: float = 0.9,
                    target: tuple[float, float, float] = (0.0, 0.15, 0.0),
                    fov_deg: float = 22.0, dtype: torch.dtype = torch.float32) -> Camera:
    """A frontal head-and-shoulders camera for a head model in SMPL-X units (metres)."""
    tgt = torch.tensor([target], dtype=dtype)
    eye = tgt + torch.tensor([[0.0, 0.0, distance]], dtype=dtype)
    return Camera.look_at(eye, tgt, image_size, fov_deg)
