"""The one PSNR/SSIM definition: the same images score the same in either value range, PSNR is
per frame then averaged (not the PSNR of the pooled error), identical frames are capped."""
import math

import torch

from models.metrics import PSNR_CAP_DB, SIGNED, UINT8, frame_psnr, psnr, psnr_from_mse, ssim, video_frames


def _frames(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    truth = torch.randint(0, 256, (4, 3, 16, 16), generator=g).float()
    noise = torch.randn(truth.shape, generator=g) * torch.tensor([2.0, 4.0, 8.0, 16.0])[:, None, None, None]
    return (truth + noise).round().clamp(0, 255), truth


def test_the_two_value_ranges_give_the_same_numbers():
    pred, truth = _frames()
    signed = lambda x: x / 127.5 - 1
    assert abs(psnr(pred, truth, UINT8) - psnr(signed(pred), signed(truth), SIGNED)) < 1e-4
    assert abs(ssim(pred, truth, UINT8) - ssim(signed(pred), signed(truth), SIGNED)) < 1e-5


def test_psnr_is_per_frame_then_averaged_and_capped():
    pred, truth = _frames()
    per_frame = [10 * math.log10(255.0 ** 2 / float((p - t).square().mean())) for p, t in zip(pred, truth)]
    assert torch.allclose(frame_psnr(pred, truth, UINT8), torch.tensor(per_frame), atol=1e-4)
    pooled = 10 * math.log10(255.0 ** 2 / float((pred - truth).square().mean()))
    assert psnr(pred, truth, UINT8) > pooled + 1.0          # frames of unequal noise: not the same quantity
    assert psnr(truth, truth, UINT8) == PSNR_CAP_DB and float(psnr_from_mse(0.0)) == PSNR_CAP_DB


def test_videos_are_scored_frame_by_frame():
    video = torch.rand(2, 3, 5, 8, 8) * 2 - 1
    frames = video_frames(video)
    assert frames.shape == (10, 3, 8, 8) and torch.equal(frames[6], video[1, :, 1])
