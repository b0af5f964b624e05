"""Shaded RGB images from condition maps: Lambertian albedo under ambient + one directional
light, over a background. Used to render the synthetic talking-head world."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .conditions import ConditionMaps


@dataclass
class Lighting:
    ambient: Tensor       # (3,) or (T, 3) RGB
    diffuse: Tensor       # (3,) or (T, 3) RGB of the directional light
    direction: Tensor     # (3,) or (T, 3) camera-space direction towards the light (unit)
    specular: float = 0.08
    shininess: float = 24.0


def shade(maps: ConditionMaps, lighting: Lighting, background: Tensor) -> Tensor:
    """RGB in [0, 1] (T, H, W, 3). ``background`` is (3,), (H, W, 3) or (T, H, W, 3)."""
    if maps.albedo is None:
        raise ValueError("shade() needs maps rendered with vertex_colors")
    t = maps.normals.shape[0]
    per_frame = lambda x: x.reshape(-1, 1, 1, 3).expand(t, 1, 1, 3) if x.dim() <= 2 else x
    n = maps.normals
    l_dir = torch.nn.functional.normalize(per_frame(lighting.direction), dim=-1)
    ndotl = (n * l_dir).sum(-1, keepdim=True).clamp(min=0.0)
    # Blinn-Phong highlight for a camera looking down +z (view vector -z in camera space).
    half = torch.nn.functional.normalize(l_dir + torch.tensor([0.0, 0.0, -1.0]).to(n), dim=-1)
    spec = (n * half).sum(-1, keepdim=True).clamp(min=0.0) ** lighting.shininess
    lit = maps.albedo * (per_frame(lighting.ambient) + per_frame(lighting.diffuse) * ndotl)
    lit = lit + lighting.specular * spec * per_frame(lighting.diffuse)
    alpha = maps.silhouette[..., None]
    bg = background.expand(t, *maps.normals.shape[1:3], 3) if background.dim() < 4 else background
    return (lit * alpha + bg * (1 - alpha)).clamp(0.0, 1.0)
