"""Sampling a video from a reference image and driving normals (math only: no files, no I/O).

    latents_ref = codec.encode_reference(reference image, F)
    x0          = flow.sample(model, noise, reference latent + normals)      (Euler, diffusers' scheduler)
    video       = codec.decode(x0)

The first latent frame of the result is the reference frame (Wan I2V: mask 1 on latent frame
0), so frame 0 of the video reproduces the reference image up to the codec.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .codec import LatentCodec
from .flavors import latent_shape
from .flow import sample


@torch.no_grad()
def generate_video(model: nn.Module, codec: LatentCodec, reference_image: Tensor, driving_normals: Tensor,
                   reference_normal: Tensor | None = None, steps: int = 20, guidance: float = 1.0,
                   shift: float = 5.0, generator: torch.Generator | None = None, progress: bool = False,
                   reference_latent: Tensor | None = None) -> Tensor:
    """Video (B, 3, F, H, W) in [-1, 1], fp32.

    reference_image: (B, 3, H, W) in [-1, 1]; driving_normals: (B, 3, F=4k+1, H, W) in [-1, 1];
    reference_normal: (B, 3, H, W) (None: the first driving frame's); ``reference_latent``:
    precomputed ``codec.encode_reference`` (skips that encode)."""
    b, _, frames, h, w = driving_normals.shape
    t, lh, lw = latent_shape(frames, h, w, codec.spatial_factor)
    device = driving_normals.device
    if reference_latent is None:
        reference_latent = codec.encode_reference(reference_image.float(), frames)
    if reference_normal is None:
        reference_normal = driving_normals[:, :, 0]
    conditions = {"reference_latent": reference_latent.float(), "driving_normals": driving_normals.float(),
                  "reference_normal": reference_normal.float()}
    x0 = sample(model, (b, codec.latent_channels, t, lh, lw), conditions, steps=steps, guidance=guidance, shift=shift,
                generator=generator, device=device, progress=progress)
    return codec.decode(x0).clamp(-1, 1)


__all__ = ["generate_video"]
