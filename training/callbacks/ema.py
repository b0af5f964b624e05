"""An fp32 exponential moving average of the trained weights, kept by this callback.

Why not Lightning's ``WeightAveraging``/``EMAWeightAveraging``: its ``on_save_checkpoint``
puts the average into ``checkpoint["state_dict"]``, and ``DeepSpeedStrategy.save_checkpoint``
drops ``state_dict`` from the client state (the engine saves the live weights itself), so the
average is lost from DeepSpeed checkpoints and its ``on_load_checkpoint`` then finds no
``state_dict`` (read in lightning 2.6.6's code, not run). Here the EMA is the callback's own
state (``checkpoint["callbacks"]["EMA"]``), a key the DeepSpeed client state keeps.

- shadow = decay_n · shadow + (1 − decay_n) · θ after every optimizer step, in fp32 whatever
  the training precision; decay_n = min(decay, (1 + n) / (10 + n)) (warm-up, n = updates);
- ZeRO-1/2 keep full parameters on every rank, so every rank holds the same EMA. ZeRO-3 is
  refused at setup, before any model is built (a user error, exit 2): its parameters are
  per-rank shards, and a full fp32 EMA on each rank would undo the partitioning. Under ZeRO-3
  export the live weights (``python -m training.export --checkpoint DIR --out OUT --no-ema``);
  an EMA on the master shards (Open-Sora's ``update_ema(sharded=True)``) is not built;
- at the end of fit, rank 0 exports the EMA weights with the module's config
  (``save_pretrained``: safetensors + config.json) into ``export_dir`` and logs the folder to
  MLflow when the trainer has an MLflow logger.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from .config import mlflow_logger


class EMA(Callback):
    def __init__(self, decay: float = 0.99, warmup: bool = True, export_dir: str | None = None,
                 export_name: str = "ema") -> None:
        self.decay = decay
        self.warmup = warmup
        self.export_dir = export_dir
        self.export_name = export_name
        self.shadow: dict[str, torch.Tensor] | None = None
        self.updates = 0
        self.last_step = -1
        self.exported: Path | None = None

    @property
    def state_key(self) -> str:
        return "EMA"

    # -- averaging --------------------------------------------------------------------------
    @staticmethod
    def _params(pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        return {n: p for n, p in pl_module.named_parameters() if p.requires_grad}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if getattr(trainer.strategy, "zero_stage_3", False):
            from preprocessing.errors import UserError
            raise UserError("the EMA callback keeps full fp32 weights on every rank, which ZeRO-3 partitions: "
                            "remove training.callbacks.EMA from trainer.callbacks under stage 3 (export the live "
                            "weights: python -m training.export --checkpoint DIR --out OUT --no-ema), or train "
                            "under ZeRO-1/2", callback="training.callbacks.EMA", stage=3)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_train_start, not on_fit_start: DeepSpeed restores callback states after fit start
        if self.shadow is None:
            self.shadow = {n: p.detach().float().clone() for n, p in self._params(pl_module).items()}
        else:                                      # restored from a checkpoint
            self.shadow = {n: v.float().to(pl_module.device) for n, v in self.shadow.items()}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.last_step:       # accumulating: no optimizer step yet
            return
        self.last_step = trainer.global_step
        d = self.current_decay()
        for name, p in self._params(pl_module).items():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - d)
        self.updates += 1

    # -- checkpoint state -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "last_step": self.last_step,
                "shadow": {k: v.detach().cpu() for k, v in (self.shadow or {}).items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.updates = int(state_dict["updates"])
        self.last_step = int(state_dict["last_step"])
        self.shadow = dict(state_dict["shadow"]) or None

    # -- export -----------------------------------------------------------------------------
    def ema_weights(self, prefix: str = "model.") -> dict[str, torch.Tensor]:
        """EMA tensors of the parameters under ``prefix``, with the prefix removed."""
        return {k[len(prefix):]: v for k, v in (self.shadow or {}).items() if k.startswith(prefix)}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.export_dir is None or not hasattr(pl_module, "export_module"):
            return
        if trainer.is_global_zero:
            from preprocessing import storage
            from training.export import export_pretrained
            out = storage.url_join(self.export_dir, self.export_name)     # a folder or a URL
            with storage.staged_folder(out) as local:                     # uploaded at the end if a URL
                export_pretrained(pl_module.export_module(), self.ema_weights(), local)
                logger = mlflow_logger(trainer)
                if logger is not None:
                    logger.experiment.log_artifacts(logger.run_id, local, artifact_path=f"export/{self.export_name}")
            self.exported = Path(out) if storage.local_path(out) is not None else out
        trainer.strategy.barrier()
