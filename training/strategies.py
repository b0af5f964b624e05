"""Strategies chosen by configuration.

``CPUDeepSpeedStrategy`` runs DeepSpeed ZeRO (1/2/3, fp32 or bf16) on CPU processes with gloo:
Lightning's stock ``DeepSpeedStrategy`` refuses any accelerator but CUDA. On GPUs use
:class:`DeepSpeedStrategy` (the stock class plus the fp32 geometry below); the configs differ
only in ``class_path``.

Geometry stays fp32 under bf16: Lightning's DeepSpeed precision plugin casts every floating
tensor of a batch to the training dtype (``convert_input``), cameras and poses included (bf16
keeps 8 bits of mantissa: 2-4 px at a 700 px focal length). Both strategies here give the plugin
the batch keys the LightningModule names in ``fp32_batch_keys`` (the generator: the SMPL-X
parameters and cameras, the static offsets), which it leaves untouched.

Resume on another world size: both DeepSpeed strategies load a universal checkpoint folder
(``python -m training.checkpoints to-universal``: it holds ``latest_universal``) as DeepSpeed's
universal checkpoint (its ``load_universal`` setting, switched on for that load only), so a run
saved on N processes resumes on M with the same fp32 master weights and Adam moments.
"""
from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.plugins.precision import DeepSpeedPrecision, Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies import DeepSpeedStrategy as StockDeepSpeedStrategy


class GeometryFp32Precision(DeepSpeedPrecision):
    """DeepSpeed's precision plugin that leaves the batch entries named in ``keep_fp32`` as they are."""

    def __init__(self, precision, keep_fp32: tuple[str, ...] = ()) -> None:
        super().__init__(precision)
        self.keep_fp32 = tuple(keep_fp32)

    def convert_input(self, data: Any) -> Any:
        if isinstance(data, dict) and self.keep_fp32:
            return {k: v if k in self.keep_fp32 else super(GeometryFp32Precision, self).convert_input(v)
                    for k, v in data.items()}
        return super().convert_input(data)


class _GeometryFp32:
    """Mixin: the strategy's DeepSpeed precision plugin keeps the module's ``fp32_batch_keys``."""

    @property
    def precision_plugin(self):
        return self._precision_plugin if self._precision_plugin is not None else Precision()

    @precision_plugin.setter
    def precision_plugin(self, plugin) -> None:
        if type(plugin) is DeepSpeedPrecision:
            plugin = GeometryFp32Precision(plugin.precision)
        self._precision_plugin = plugin

    def setup(self, trainer) -> None:
        if isinstance(self._precision_plugin, GeometryFp32Precision):
            self._precision_plugin.keep_fp32 = tuple(getattr(self.lightning_module, "fp32_batch_keys", ()))
        super().setup(trainer)


class _UniversalResume:
    """Mixin: a checkpoint folder written by ``training.checkpoints.to_universal`` is loaded as
    DeepSpeed's universal checkpoint (on any number of processes); others as before."""

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        from training.checkpoints import is_universal
        config = self.deepspeed_engine._config          # the engine reads load_universal from it at load time
        before = config.load_universal_checkpoint
        config.load_universal_checkpoint = before or is_universal(checkpoint_path)
        try:
            return super().load_checkpoint(checkpoint_path, weights_only)
        finally:
            config.load_universal_checkpoint = before


class DeepSpeedStrategy(_UniversalResume, _GeometryFp32, StockDeepSpeedStrategy):
    """Lightning's DeepSpeed strategy (GPUs) with geometry kept fp32 in the batch."""


class CPUDeepSpeedStrategy(_UniversalResume, _GeometryFp32, StockDeepSpeedStrategy):
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
