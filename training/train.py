"""The training entry point (LightningCLI):

    python -m training.train fit --config configs/train/transfer_tiny.yaml [--ckpt_path last]
    python -m training.train validate --config ... --ckpt_path PATH
    python -m training.train fit --config configs/train/transfer_tiny.yaml \
        --config configs/train/strategy/ddp_cpu.yaml              # strategies by configuration

Model and data are given by ``class_path`` (one platform for the transfer module and the
generator). The resolved config is logged to MLflow as an artifact
(:class:`~training.callbacks.MLflowSaveConfigCallback`).
"""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _environment() -> None:
    # DeepSpeed JIT-compiles ops on first use: keep them in a cache that survives runs.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


#: (init arg, sub-path of ``--out``) filled in where a config leaves them null
OUT_PATHS = {"dirpath": "checkpoints", "out_dir": "", "export_dir": "export"}


def fill_out_paths(cfg, out: str) -> None:
    """Give the logger, checkpoint and export folders that are null a place under ``out``
    (``--out`` moves a whole run: store, artifacts, checkpoints, export)."""
    if getattr(cfg.trainer, "default_root_dir", None) in (None, ""):
        cfg.trainer.default_root_dir = out
    parts = []
    for key in ("logger", "callbacks"):
        value = getattr(cfg.trainer, key, None)
        parts += value if isinstance(value, list) else [value] if value is not None else []
    for part in parts:
        init = getattr(part, "init_args", None)
        if init is None:
            continue
        for name, sub in OUT_PATHS.items():
            if name in init and init[name] is None:
                init[name] = str(Path(out) / sub) if sub else out


def build_cli(args: list[str] | None = None, run: bool = True):
    """The LightningCLI (lightning imported lazily: it is heavy)."""
    _environment()
    import warnings

    import lightning.pytorch as pl
    from lightning.pytorch.cli import LightningCLI

    from training.callbacks.config import MLflowSaveConfigCallback

    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")

    class TrainCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--out", default="outputs/train/run",
                                help="output folder of the run: MLflow store, checkpoints, export")

        def before_instantiate_classes(self) -> None:
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            fill_out_paths(cfg, cfg.out)

    return TrainCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True,
                    subclass_mode_data=True, save_config_callback=MLflowSaveConfigCallback,
                    save_config_kwargs={"overwrite": True}, args=args, run=run,
                    auto_configure_optimizers=False)


def main(args: list[str] | None = None) -> None:
    build_cli(args)


if __name__ == "__main__":
    main()
