"""Image metrics, one definition for ``evaluate``, the benchmarks and training: PSNR and SSIM.

One convention. Frames are images ``(N, C, H, W)`` (a video ``(B, C, T, H, W)`` through
:func:`video_frames`) with values in a stated range: :data:`UINT8` ``[0, 255]`` (decoded
videos) or :data:`SIGNED` ``[-1, 1]`` (the generator's tensors). Both are clamped to the range
and mapped to ``[0, 1]``; PSNR is computed per frame (peak 1, capped at :data:`PSNR_CAP_DB`
where frames are identical) and averaged over frames in dB; SSIM is torchmetrics' Gaussian SSIM
(11 px window) on the same ``[0, 1]`` images, averaged over frames. So a number in dB means the
same thing in every report: a benchmark's, ``evaluate``'s and the training callback's.
"""
from __future__ import annotations

import torch
from torch import Tensor

UINT8 = (0.0, 255.0)
SIGNED = (-1.0, 1.0)
PSNR_CAP_DB = 100.0      # identical frames: PSNR is infinite; reported capped here


def to_unit(frames: Tensor, value_range: tuple[float, float]) -> Tensor:
    """Frames in ``value_range`` -> float in ``[0, 1]`` (clamped)."""
    lo, hi = value_range
    return ((frames.float() - lo) / (hi - lo)).clamp(0.0, 1.0)


def video_frames(video: Tensor) -> Tensor:
    """A batch of videos ``(B, C, T, H, W)`` as frames ``(B·T, C, H, W)``."""
    b, c, t, h, w = video.shape
    return video.transpose(1, 2).reshape(b * t, c, h, w)


def psnr_from_mse(mse: Tensor | float, data_range: float = 1.0) -> Tensor:
    """PSNR (dB) of a mean squared error for values spanning ``data_range``, capped."""
    mse = torch.as_tensor(mse, dtype=torch.float64)
    return (10.0 * torch.log10(data_range ** 2 / mse)).clamp(max=PSNR_CAP_DB)


def frame_psnr(pred: Tensor, target: Tensor, value_range: tuple[float, float]) -> Tensor:
    """PSNR (dB, capped) of each frame ``(N, C, H, W)`` -> ``(N,)``."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    p, t = to_unit(pred, value_range), to_unit(target, value_range)
    mse = (p - t).square().mean(dim=(1, 2, 3))
    return psnr_from_mse(mse).float()


def psnr(pred: Tensor, target: Tensor, value_range: tuple[float, float]) -> float:
    """PSNR (dB): per frame, capped, averaged over the frames."""
    return float(frame_psnr(pred, target, value_range).mean())


def psnr_capped(pred: Tensor, target: Tensor, value_range: tuple[float, float]) -> bool:
    """Whether a frame's PSNR hit the cap (identical frames)."""
    return bool((frame_psnr(pred, target, value_range) >= PSNR_CAP_DB).any())


def ssim(pred: Tensor, target: Tensor, value_range: tuple[float, float]) -> float:
    """SSIM (torchmetrics' Gaussian window) of frames ``(N, C, H, W)``, averaged over frames."""
    from torchmetrics.functional.image import structural_similarity_index_measure
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    return float(structural_similarity_index_measure(to_unit(pred, value_range), to_unit(target, value_range),
                                                     data_range=1.0))


def l1(pred: Tensor, target: Tensor, value_range: tuple[float, float]) -> float:
    """Mean absolute difference in ``[0, 1]`` units."""
    return float((to_unit(pred, value_range) - to_unit(target, value_range)).abs().mean())
