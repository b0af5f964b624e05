"""What the generator is shown: the one frame transform and the one resolution path of its
normal maps, shared by training (``training.tasks.generator``) and inference
(``expportrait.reenactment``).

- frames and normal maps are uint8 (T, H, W, 3) at their own size (the crop size for frames);
  :func:`generator_video` turns them into the model's (B, 3, T, size, size) in [-1, 1]
  (antialiased bilinear, half-pixel centres: :meth:`models.render.camera.Camera.resized`);
- normal maps re-rendered for the generator are rendered at :func:`normal_render_size` (twice
  the generator's size, at most the crop's) in the crop's cameras resized there, then go
  through the same transform.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def unit(images: Tensor) -> Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) in [-1, 1] (video: (B, T, H, W, 3) ->
    (B, 3, T, H, W))."""
    x = torch.as_tensor(images).float().div(127.5).sub(1.0)
    return x.permute(0, 4, 1, 2, 3) if x.ndim == 5 else x.permute(0, 3, 1, 2)


def resize_video(video: Tensor, size: int | None) -> Tensor:
    """(B, 3, T, H, W) -> (B, 3, T, size, size) (antialiased bilinear); unchanged if None or equal."""
    if size is None or video.shape[-1] == size and video.shape[-2] == size:
        return video
    b, c, t, h, w = video.shape
    flat = video.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    flat = F.interpolate(flat, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return flat.reshape(b, t, c, size, size).permute(0, 2, 1, 3, 4)


def generator_video(frames: Tensor, size: int | None) -> Tensor:
    """The frame transform: uint8 (B, T, H, W, 3) -> (B, 3, T, size, size) float32 in [-1, 1]."""
    return resize_video(unit(frames), size)


def to_uint8(video: Tensor) -> Tensor:
    """(B, 3, T, H, W) in [-1, 1] -> uint8 (B, T, H, W, 3) (for display)."""
    return video.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)


def normal_render_size(crop_size: int, size: int | None) -> int:
    """The side normal maps are rendered at for a generator of side ``size``: 2·size (antialiased
    down by :func:`generator_video` after), at most the crop's; the crop's when ``size`` is None."""
    return crop_size if not size else min(crop_size, 2 * size)


def generator_normal_maps(head, params, static_offsets: Tensor | None, dynamic_offsets: Tensor | None,
                          camera, size: int | None) -> Tensor:
    """Normal maps uint8 (T, R, R, 3) of a posed head for a generator of side ``size``, rendered at
    R = :func:`normal_render_size` in ``camera`` (the crop's cameras, square) resized there;
    training and inference both render the generator's normals with this, then
    :func:`generator_video` takes them to ``size``."""
    from models.transfer.inputs import render_normal_maps
    render = normal_render_size(int(camera.image_size[0]), size)
    return render_normal_maps(head, params, static_offsets, dynamic_offsets, camera.resized(render))


def transfer_normal_maps(head, module, smplx: dict[str, Tensor], static_offsets: Tensor, crop_size: int,
                         size: int | None) -> Tensor:
    """The driving normals of one sample's frames: uint8 (T, R, R, 3), the head re-posed with the
    sample's (ψ, jaw, pose, camera, β, Δg) and the Δf that the frozen transfer ``module``
    predicts, rendered by :func:`generator_normal_maps` in the sample's crop cameras. ``smplx``:
    per-frame arrays (T, ...) and ``betas``; ``static_offsets`` Δg (N, 3). The generator task
    renders its window with this, and ``pipelines.render_normals`` whole samples."""
    from models.render.camera import Camera
    from models.transfer.inputs import head_params, neutral_inputs
    params = head_params(smplx)
    static = static_offsets.detach().float().cpu()
    with torch.no_grad():
        neutral, static_face = neutral_inputs(head, params.betas, static[None])
        delta = module(params.expression[None], params.jaw_pose[None], neutral, static_face)[0]
    cam = Camera.from_matrices(smplx["camera_K"], smplx["camera_R"], smplx["camera_t"], (crop_size, crop_size))
    return generator_normal_maps(head, params, static, delta.float(), cam, size)
