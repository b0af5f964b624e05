"""The resolved LightningCLI config as an MLflow artifact.

LightningCLI's ``SaveConfigCallback`` writes into the logger's log folder, which an
``sqlite:///`` or ``http://`` MLflow store does not have (``assert log_dir is not None``).
This subclass does not write there (``save_to_log_dir=False``) and logs the config to the
run from rank 0 instead.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger


def mlflow_logger(trainer: Trainer) -> MLFlowLogger | None:
    """The trainer's MLflow logger, if it has one."""
    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            return logger
    return None


class MLflowSaveConfigCallback(SaveConfigCallback):
    def __init__(self, *args, save_to_log_dir: bool = False, **kwargs) -> None:
        super().__init__(*args, save_to_log_dir=save_to_log_dir, **kwargs)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        logger = mlflow_logger(trainer)
        if logger is None:
            return
        text = self.parser.dump(self.config, skip_none=False)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / self.config_filename
            path.write_text(text)
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path="config")
