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
    which every rank takes part in), with the global step in the metadata."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def _dump(self, trainer, pl_module, name: str) -> None:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
        from safetensors.torch import save_file
        state = {}
        for n, p in pl_module.named_parameters():
            if p.requires_grad:
                state[f"{n}/fp32"] = safe_get_full_fp32_param(p)
                for key in ("exp_avg", "exp_avg_sq"):
                    state[f"{n}/{key}"] = safe_get_full_optimizer_state(p, key)
        if trainer.global_rank == 0:
            Path(self.folder).mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items() if v is not None},
                      str(Path(self.folder) / f"{name}.safetensors"), metadata={"step": str(trainer.global_step)})

    def on_train_start(self, trainer, pl_module) -> None:
        self._dump(trainer, pl_module, "start")

    def on_train_end(self, trainer, pl_module) -> None:
        self._dump(trainer, pl_module, "end")
