"""Numerical pieces the fitter and the photometric solver share: conjugate gradients, the sparse
mesh Laplacian applied to vertex values or restricted to a vertex subset, and bilinear sampling of
per-frame maps at projected points."""
from __future__ import annotations

import torch
from torch import Tensor


def conjugate_gradients(matvec, b: Tensor, iters: int, diag: Tensor | None = None) -> Tensor:
    """Jacobi-preconditioned conjugate gradients for a symmetric positive-definite system."""
    x = torch.zeros_like(b)
    r = b.clone()
    z = r / diag if diag is not None else r
    p = z.clone()
    rz = (r * z).sum()
    for _ in range(iters):
        ap = matvec(p)
        alpha = rz / (p * ap).sum().clamp(min=1e-30)
        x = x + alpha * p
        r = r - alpha * ap
        z = r / diag if diag is not None else r
        rz_new = (r * z).sum()
        if rz_new.abs() < 1e-30:
            break
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x


def lap_apply(lap: Tensor, x: Tensor) -> Tensor:
    """Sparse Laplacian on vertex-major values (N, ...)."""
    n = x.shape[0]
    return torch.sparse.mm(lap, x.reshape(n, -1)).view_as(x)


def sub_laplacian(lap: Tensor, ids: Tensor) -> Tensor:
    """The rows and columns of a sparse Laplacian restricted to ``ids`` (re-normalized)."""
    n = lap.shape[0]
    local = torch.full((n,), -1, dtype=torch.long)
    local[ids] = torch.arange(len(ids))
    idx = lap.indices()
    keep = (local[idx[0]] >= 0) & (local[idx[1]] >= 0) & (idx[0] != idx[1])
    rows, cols = local[idx[0, keep]], local[idx[1, keep]]
    deg = torch.bincount(rows, minlength=len(ids)).clamp(min=1).float()
    vals = 1.0 / deg[rows]
    diag = torch.arange(len(ids))
    all_idx = torch.cat([torch.stack([rows, cols]), torch.stack([diag, diag])], 1)
    return torch.sparse_coo_tensor(all_idx, torch.cat([vals, -torch.ones(len(ids))]),
                                   (len(ids), len(ids))).coalesce()


def sample_maps(maps: Tensor, uv: Tensor, mode: str = "bilinear") -> Tensor:
    """Values of per-frame maps (B, H, W, C) at pixel positions uv (B, N, 2) -> (B, N, C);
    pixel centres as in OpenCV, 0 outside the image."""
    h, w = maps.shape[1:3]
    grid = torch.stack([uv[..., 0] / (w - 1) * 2 - 1, uv[..., 1] / (h - 1) * 2 - 1], -1)
    out = torch.nn.functional.grid_sample(maps.permute(0, 3, 1, 2).float(), grid[:, :, None],
                                          mode=mode, align_corners=True)
    return out[..., 0].permute(0, 2, 1)
