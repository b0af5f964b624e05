"""Offset fields on the fine mesh: smooth random fields (demo sweeps, synthetic tests)."""
from __future__ import annotations

import torch
from torch import Tensor


def smooth_random_field(points: Tensor, generator: torch.Generator, amplitude: float,
                        num_blobs: int = 6, sigma: tuple[float, float] = (0.015, 0.04),
                        weight: Tensor | None = None) -> Tensor:
    """A smooth random displacement field (N, 3): Gaussian blobs centred on random points.

    The largest displacement is ``amplitude``; ``weight`` (N,) scales it per vertex (e.g. a
    face-region mask, which makes the field exactly zero outside the region).
    """
    n = points.shape[0]
    centres = points[torch.randint(0, n, (num_blobs,), generator=generator)]
    sig = torch.empty(num_blobs).uniform_(*sigma, generator=generator).to(points)
    vec = torch.randn(num_blobs, 3, generator=generator).to(points)
    d2 = torch.cdist(points, centres).square()                         # (N, B)
    field = torch.exp(-0.5 * d2 / sig.square()) @ vec
    if weight is not None:
        field = field * weight.to(points).unsqueeze(-1)
    return field * (amplitude / field.norm(dim=-1).max().clamp(min=1e-12))
