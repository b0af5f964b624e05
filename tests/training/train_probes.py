"""Test-only callbacks that training subprocesses load by class path (tests/training is put
on their PYTHONPATH)."""
from __future__ import annotations

import os
import signal
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class KillAtStep(Callback):
    """SIGKILL this process (no cleanup, like a lost node) once ``step`` optimizer steps ran."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SaveRankWeights(Callback):
    """Each rank writes its final weights to ``<folder>/rank<r>.safetensors``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_fit_end(self, trainer, pl_module) -> None:
        from safetensors.torch import save_file
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in pl_module.model.state_dict().items()}
        save_file(state, str(Path(self.folder) / f"rank{trainer.global_rank}.safetensors"))


import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402


class TinyTask(pl.LightningModule):
    """A linear regression: the smallest LightningModule a strategy can train."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TinyData(pl.LightningDataModule):
    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(32, 4, generator=g)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


class OptimizerState(Callback):
    """Rank 0 writes ``<folder>/start.safetensors`` when training starts (after a resume has
    loaded its checkpoint) and ``<folder>/end.safetensors`` when it ends: every trainable
    parameter's fp32 master weights and Adam moments, whole (DeepSpeed's ``safe_get_full_*``,
    which every rank takes part in), with the global step and the transfer task's loss on a
    fixed batch (the first validation batch) in the metadata."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def _dump(self, trainer, pl_module, name: str) -> None:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
        from safetensors.torch import save_file
        zero = trainer.strategy.deepspeed_engine.optimizer
        if trainer.global_step > 0:
            # DeepSpeed (ZeRO-1/2) links the fragments to the Adam state after the first step of the
            # first param group, before the other groups have any state: link them again now
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()
        state = {}
        for n, p in pl_module.named_parameters():
            if p.requires_grad:
                state[f"{n}/fp32"] = safe_get_full_fp32_param(p)
                if trainer.global_step > 0:              # no Adam state before the first step (all ranks agree)
                    for key in ("exp_avg", "exp_avg_sq"):
                        state[f"{n}/{key}"] = safe_get_full_optimizer_state(p, key)
        if trainer.global_rank == 0:
            Path(self.folder).mkdir(parents=True, exist_ok=True)
            meta = {"step": str(trainer.global_step), "fixed_loss": repr(self.fixed_loss(trainer, pl_module))}
            save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items() if v is not None},
                      str(Path(self.folder) / f"{name}.safetensors"), metadata=meta)

    @staticmethod
    def fixed_loss(trainer, pl_module) -> float:
        """The transfer task's loss (mm²) on the first 2 validation samples (whatever the world
        size), with the weights as they are."""
        import torch

        from training.data.datamodule import TRANSFER_FIELDS
        from training.data.shards import ShardDataset, collate, shard_urls
        from training.tasks.transfer import centred_mse_mm
        dataset = ShardDataset(shard_urls(trainer.datamodule.root, "val"), 2, resampled=False, rank=0, world_size=1,
                               fields=TRANSFER_FIELDS)
        batch = collate(list(dataset))
        with torch.no_grad():
            expr, jaw, neutral, static = pl_module.inputs(batch)
            pred = pl_module.model(expr, jaw, neutral, static).float()
        return float(centred_mse_mm(pred, batch["dynamic_offsets"].float()))

    def on_train_start(self, trainer, pl_module) -> None:
        self._dump(trainer, pl_module, "start")

    def on_train_end(self, trainer, pl_module) -> None:
        self._dump(trainer, pl_module, "end")
