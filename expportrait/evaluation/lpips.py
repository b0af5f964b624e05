"""LPIPS (AlexNet) from a *local* backbone file, or skipped with a note.

torchmetrics' LPIPS fetches its ImageNet backbone through torchvision at construction (a
download, and torchvision is not installed here). Its learned linear heads ship inside
torchmetrics (``lpips_models/alex.pth``); the AlexNet feature weights must come from a local
file in torchvision's layout (``alexnet-owt-7be5be79.pth``: ``features.{0,3,6,8,10}.*``). This
module rebuilds AlexNet's feature stack (torchvision's layers, no torchvision import) and
reuses torchmetrics' scaling, normalisation and heads, so the score equals torchmetrics'.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import torch
from torch import nn

_SLICES = ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12))      # relu1 .. relu5 of AlexNet features
_CHANNELS = (64, 192, 384, 256, 256)


def _alexnet_features() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(inplace=False), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=False), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=False),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=False),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=False), nn.MaxPool2d(3, 2))


class LocalLPIPS(nn.Module):
    """LPIPS-AlexNet with the backbone read from ``backbone_path`` (no download)."""

    def __init__(self, backbone_path: str | Path) -> None:
        super().__init__()
        from torchmetrics.functional.image import lpips as tm
        path = Path(backbone_path)
        if not path.is_file():
            raise FileNotFoundError(f"LPIPS backbone file not found: {path} (torchvision AlexNet weights)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        feats = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        if not feats:
            raise ValueError(f"{path} holds no 'features.*' weights (expected torchvision's AlexNet layout)")
        self.features = _alexnet_features()
        self.features.load_state_dict(feats, strict=True)
        self.scaling = tm.ScalingLayer()
        self.lins = nn.ModuleList(tm.NetLinLayer(c, use_dropout=True) for c in _CHANNELS)
        heads = Path(inspect.getfile(tm)).parent / "lpips_models" / "alex.pth"
        lin_state = torch.load(heads, map_location="cpu", weights_only=True)
        for i, lin in enumerate(self.lins):
            lin.load_state_dict({k.removeprefix(f"lin{i}."): v for k, v in lin_state.items()
                                 if k.startswith(f"lin{i}.")})
        self._tm = tm
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-image LPIPS of (N, 3, H, W) images in [-1, 1]."""
        xa, xb = self.scaling(a), self.scaling(b)
        total = torch.zeros(a.shape[0])
        for (lo, hi), lin in zip(_SLICES, self.lins):
            xa, xb = self.features[lo:hi](xa), self.features[lo:hi](xb)
            d = (self._tm._normalize_tensor(xa) - self._tm._normalize_tensor(xb)) ** 2
            total = total + self._tm._spatial_average(lin(d), keep_dim=True).reshape(-1)
        return total


def lpips_score(pred: np.ndarray, target: np.ndarray, backbone_path: str | Path | None) -> dict:
    """Mean LPIPS of two uint8 videos (T, H, W, 3); ``{"lpips": None, "note": ...}`` without a backbone."""
    if backbone_path is None:
        return {"lpips": None, "note": "LPIPS skipped: no local backbone given (--lpips-backbone; "
                                       "torchvision AlexNet weights); nothing is downloaded"}
    net = LocalLPIPS(backbone_path)
    to = lambda x: torch.as_tensor(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    vals = [net(to(pred[i:i + 8]), to(target[i:i + 8])) for i in range(0, len(pred), 8)]
    return {"lpips": float(torch.cat(vals).mean()), "note": f"LPIPS-AlexNet, backbone {backbone_path}"}
