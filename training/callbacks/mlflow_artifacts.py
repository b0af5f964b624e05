"""Checkpoints to MLflow, DeepSpeed folders included.

``MLFlowLogger(log_model=True)`` uploads checkpoint files only; a DeepSpeed checkpoint is a
folder written collectively by every rank and is skipped silently. At the end of fit every
rank meets at a barrier (after the last collective save), then rank 0 logs the last and the
best checkpoint, file or folder, under ``checkpoints/``.
"""
from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from .config import mlflow_logger


class LogCheckpointsToMLflow(Callback):
    def __init__(self, last: bool = True, best: bool = False) -> None:
        self.last = last
        self.best = best
        self.logged: list[str] = []

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.strategy.barrier()
        logger = mlflow_logger(trainer)
        if not trainer.is_global_zero or logger is None:
            return
        paths = []
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint):
                if self.last and cb.last_model_path:
                    paths.append(cb.last_model_path)
                if self.best and cb.best_model_path:
                    paths.append(cb.best_model_path)
        for path in dict.fromkeys(paths):
            p = Path(path)
            if p.is_dir():
                logger.experiment.log_artifacts(logger.run_id, str(p), artifact_path=f"checkpoints/{p.name}")
            elif p.is_file():
                logger.experiment.log_artifact(logger.run_id, str(p), artifact_path="checkpoints")
            else:
                continue
            self.logged.append(str(p))
