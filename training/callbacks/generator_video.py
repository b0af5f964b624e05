"""Side-by-side sample videos of the generator, logged to MLflow.

On rank 0, every ``every_n_epochs`` validation epochs and at the end of fit, the first
``max_samples`` validation samples are generated (``steps`` Euler steps, the task's guidance)
and written as one mp4 per call, a row per sample::

    reference image | driving normals | generated | ground truth

to the run's ``videos/`` artifacts (``samples_<tag>.mp4``), with the PSNR of the generated
frames against the ground truth logged as ``val/sample_psnr_db``. Sampling runs under the
live weights, or the EMA weights when an :class:`~training.callbacks.EMA` callback is there
(``use_ema``), swapped in and back out.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch

from training.export import weights_swapped

from .config import mlflow_logger
from .ema import EMA
from .video import PeriodicVideo


def side_by_side(reference: torch.Tensor, normals: torch.Tensor, generated: torch.Tensor,
                 truth: torch.Tensor) -> np.ndarray:
    """(T, B·H, 4·W, 3) uint8 from videos (B, 3, T, H, W) in [-1, 1] (reference: (B, 3, H, W),
    held over the frames)."""
    from models.generator import to_pixels
    t = generated.shape[2]
    ref = reference[:, :, None].expand(-1, -1, t, -1, -1)
    row = torch.cat([ref, normals, generated, truth], dim=4)           # panels along the width
    pixels = to_pixels(row.float().cpu())                              # (B, T, H, 4W, 3)
    return torch.cat(list(pixels), dim=1).numpy()                      # samples stacked in height


def psnr_db(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """PSNR (dB, :mod:`models.metrics`) of videos (B, 3, T, H, W) in [-1, 1] over frames 1..
    (frame 0 is the given reference)."""
    from models.metrics import SIGNED, psnr, video_frames
    return psnr(video_frames(pred[:, :, 1:]), video_frames(truth[:, :, 1:]), SIGNED)


class GeneratorSamples(PeriodicVideo):
    def __init__(self, every_n_epochs: int = 5, max_samples: int = 2, steps: int = 10, fps: float = 5.0,
                 use_ema: bool = True, seed: int = 0) -> None:
        self.every_n_epochs = every_n_epochs
        self.max_samples = max_samples
        self.steps = steps
        self.fps = fps
        self.use_ema = use_ema
        self.seed = seed
        self._batch: dict | None = None
        self.written: list[str] = []
        self.psnr: dict[str, float] = {}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and dataloader_idx == 0 and self._batch is None and trainer.is_global_zero:
            self._batch = _head(batch, self.max_samples)


    def _ema(self, trainer: pl.Trainer) -> EMA | None:
        if not self.use_ema:
            return None
        return next((cb for cb in trainer.callbacks if isinstance(cb, EMA) and cb.shadow), None)

    @torch.no_grad()
    def render(self, pl_module: pl.LightningModule, batch: dict, ema: EMA | None = None) -> tuple[np.ndarray, float]:
        """The side-by-side frames and the PSNR of the generated frames."""
        batch = _to(batch, pl_module.device)
        x = pl_module.inputs(batch, None, training=False)
        was_training = pl_module.training
        pl_module.eval()
        try:
            with weights_swapped(pl_module, ema.shadow if ema is not None else {}):
                generated = pl_module.generate(x, steps=self.steps, seed=self.seed)
        finally:
            pl_module.train(was_training)
        frames = side_by_side(x["reference_image"], x["normals"], generated, x["video"])
        return frames, psnr_db(generated, x["video"])

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> None:
        logger = mlflow_logger(trainer)
        if not trainer.is_global_zero or self._batch is None or logger is None:
            return
        from preprocessing.video import write_video
        frames, psnr = self.render(pl_module, self._batch, self._ema(trainer))
        with tempfile.TemporaryDirectory() as tmp:
            path = write_video(Path(tmp) / f"samples_{tag}.mp4", _even(frames), self.fps)
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path="videos")
        logger.experiment.log_metric(logger.run_id, "val/sample_psnr_db", psnr, step=trainer.global_step)
        self.written.append(tag)
        self.psnr[tag] = psnr


def _head(batch: dict, n: int) -> dict:
    """The first ``n`` samples of a batch, on the CPU."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v[:n].detach().cpu()
        elif isinstance(v, dict):
            out[k] = {kk: vv[:n].detach().cpu() for kk, vv in v.items()}
        else:
            out[k] = v[:n]
    return out


def _to(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else
                {kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict) else v) for k, v in batch.items()}


def _even(frames: np.ndarray) -> np.ndarray:
    """H.264 needs even sides: pad by one pixel where odd."""
    t, h, w, c = frames.shape
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
