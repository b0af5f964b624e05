"""A rendered comparison video of the transfer module, logged to MLflow.

On rank 0, every ``every_n_epochs`` validation epochs and at the end of fit, the first
validation sample is rendered three ways, side by side as normal maps: the head with the
sample's own Δf (left), with the module's Δf (middle), with no Δf (right); in the sample's
cameras at ``size``². The mp4 goes to the run's ``videos/`` artifacts.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from .config import mlflow_logger


class PeriodicVideo(Callback):
    """Schedule shared by the video callbacks: ``_log(trainer, module, tag)`` every
    ``every_n_epochs`` validation epochs (not in the sanity check) and once at the end of fit."""
    every_n_epochs: int = 1

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> None:
        raise NotImplementedError

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self._log(trainer, pl_module, f"epoch{trainer.current_epoch:03d}")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, pl_module, "final")


class ComparisonVideo(PeriodicVideo):
    def __init__(self, every_n_epochs: int = 1, size: int = 128, max_frames: int = 24, fps: float = 12.5) -> None:
        self.every_n_epochs = every_n_epochs
        self.size = size
        self.max_frames = max_frames
        self.fps = fps
        self._batch: dict | None = None
        self.written: list[str] = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and dataloader_idx == 0 and self._batch is None and trainer.is_global_zero:
            self._batch = _first_sample(batch)


    def render(self, pl_module: pl.LightningModule, sample: dict) -> np.ndarray:
        """(T, size, 3·size, 3) uint8: own Δf | module's Δf | no Δf."""
        from models.transfer.inputs import head_params, neutral_inputs, render_normal_maps, scaled_camera
        head = pl_module.head
        sm = {k: v[: self.max_frames] if v.ndim > 1 and k != "betas" else v for k, v in sample["smplx"].items()}
        params = head_params(sm)
        static = sample["static_offsets"].float()[None]
        with torch.no_grad():
            neutral, static_face = neutral_inputs(head, params.betas, static.to(head.faces.device))
            pred = pl_module.model(params.expression[None].to(neutral), params.jaw_pose[None].to(neutral),
                                   neutral, static_face)[0].float().cpu()
        cam = scaled_camera(sm["camera_K"], sm["camera_R"], sm["camera_t"], self.size)
        head_cpu = head if head.faces.device.type == "cpu" else head.cpu()
        own = sample["dynamic_offsets"].float()[: params.num_frames]
        panels = [render_normal_maps(head_cpu, params, static[0], d, cam) for d in (own, pred, None)]
        return torch.cat(panels, 2).numpy()

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> None:
        logger = mlflow_logger(trainer)
        if not trainer.is_global_zero or self._batch is None or logger is None:
            return
        from preprocessing.video import write_video
        frames = self.render(pl_module, self._batch)
        with tempfile.TemporaryDirectory() as tmp:
            path = write_video(Path(tmp) / f"comparison_{tag}.mp4", frames, self.fps)
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path="videos")
        self.written.append(tag)


def _first_sample(batch: dict) -> dict:
    """Sample 0 of a batch, on the CPU."""
    out = {}
    for k in ("static_offsets", "dynamic_offsets"):
        out[k] = batch[k][0].detach().cpu()
    out["smplx"] = {k: v[0].detach().cpu() for k, v in batch["smplx"].items()}
    return out
