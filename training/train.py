"""The training entry point (LightningCLI):

    python -m training.train fit --config configs/train/transfer_tiny.yaml [--ckpt_path last]
    python -m training.train fit ... --ckpt_path UNIVERSAL   # another world size: python -m training.checkpoints
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
    from preprocessing.storage import register_s3
    register_s3()          # s3:// checkpoint and export folders through fsspec (Lightning's checkpoint IO)


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
            check_data(cfg)                        # a missing data root: exit 2 before model setup
            fill_out_paths(cfg, cfg.out)
            continue_mlflow_run(cfg)

    return TrainCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True,
                    subclass_mode_data=True, save_config_callback=MLflowSaveConfigCallback,
                    save_config_kwargs={"overwrite": True}, args=args, run=run,
                    auto_configure_optimizers=False)


def continue_mlflow_run(cfg) -> None:
    """A resumed fit (``--ckpt_path``: a requeue, a restart after ``kill -9``) logs into the MLflow
    run the interrupted one opened (``training.logging.LocalMLFlowLogger(continue_run=True)``)."""
    if not getattr(cfg, "ckpt_path", None):
        return
    loggers = getattr(cfg.trainer, "logger", None)
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        init = getattr(logger, "init_args", None)
        if init is not None and "continue_run" in init and init.get("run_id") is None:
            init["continue_run"] = True


def check_data(cfg) -> None:
    """The data module's shard root exists and holds training shards, and its sidecar folders
    cover what it does not decode (``training.data.sidecars``), before any model is built."""
    data = getattr(cfg, "data", None)
    init = getattr(data, "init_args", None)
    if init is None or "root" not in init:
        return
    from training.data.datamodule import TRANSFER_FIELDS, check_root
    check_root(init["root"], init.get("train_split") or "train")
    folders = {kind: init.get(kind) for kind in ("latents", "normals") if kind in init}
    if folders or init.get("fields") is not None:
        from training.data.sidecars import resolve_sidecars
        fields = init.get("fields")
        resolve_sidecars(init["root"], tuple(fields) if fields is not None else TRANSFER_FIELDS, folders,
                         (init.get("train_split") or "train", init.get("val_split")))


def summary(cli) -> dict:
    """The closing JSON line of a run: its MLflow run, checkpoints, export and steps."""
    trainer = cli.trainer
    out: dict = {"command": cli.subcommand, "steps": int(trainer.global_step),
                 "epochs": int(trainer.current_epoch)}
    logger = trainer.logger
    if logger is not None and hasattr(logger, "run_id"):
        out["run_id"] = logger.run_id
        out["tracking_uri"] = getattr(logger, "_tracking_uri", None)
    ckpt = trainer.checkpoint_callback
    if ckpt is not None:
        out["checkpoint"] = getattr(ckpt, "last_model_path", "") or getattr(ckpt, "best_model_path", "") or None
    exports = [str(cb.exported) for cb in trainer.callbacks if getattr(cb, "exported", None)]
    out["export"] = exports[0] if len(exports) == 1 else exports or None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 0)() == 1}
    out["metrics"] = {k: round(v, 6) for k, v in metrics.items()}
    return out


def main(args: list[str] | None = None) -> int:
    """Run the CLI in the shared command wrapper: the closing JSON line (exit 0), a user's mistake
    (exit 2, also for an argument the CLI refused), an environment fault (3), a bug (4)."""
    from preprocessing.errors import EXIT_USER, error_line, print_line, run_command

    def work() -> dict:
        try:
            return summary(build_cli(args))
        except SystemExit as stop:              # jsonargparse refused an argument (usage on stderr)
            if stop.code in (0, None):
                raise
            print_line(error_line("UsageError", "python -m training.train: invalid arguments (see above)",
                                  EXIT_USER))
            raise
    return run_command(work)


if __name__ == "__main__":
    import sys
    sys.exit(main())
