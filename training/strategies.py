"""Strategies chosen by configuration.

``CPUDeepSpeedStrategy`` runs DeepSpeed ZeRO (1/2, fp32 or bf16) on CPU processes with gloo:
Lightning's stock ``DeepSpeedStrategy`` refuses any accelerator but CUDA. On GPUs use the
stock class (``lightning.pytorch.strategies.DeepSpeedStrategy``); the configs differ only in
``class_path``.
"""
from __future__ import annotations

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeed on CPU: root device is the CPU, the environment is DDP's, no device-index
    check. Everything else (engine, ZeRO partitioning, checkpoint folders) is the stock path."""

    strategy_name = "deepspeed_cpu"

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("process_group_backend", "gloo")
        super().__init__(*args, **kwargs)

    @property
    def root_device(self) -> torch.device:
        # an index: DeepSpeed's engine reads ``device_rank`` from it (None fails; the CPU
        # accelerator ignores the value)
        return torch.device("cpu", 0)

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)       # skip the CUDA-only check of the parent

    def setup_distributed(self) -> None:
        from lightning.fabric.utilities.seed import reset_seed
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()
