"""MLflow logger with embedded defaults: an ``sqlite:///`` store and artifacts under the run's
output folder (``out_dir``); a server by ``tracking_uri`` (e.g. ``http://host:5000``)."""
from __future__ import annotations

from pathlib import Path

from lightning.pytorch.loggers import MLFlowLogger


def local_store(out_dir: str | Path) -> tuple[str, str]:
    """(tracking URI, artifact location) of the embedded store under ``out_dir``."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{out / 'mlflow.db'}", (out / "mlartifacts").as_uri()


class LocalMLFlowLogger(MLFlowLogger):
    def __init__(self, out_dir: str = "outputs/train/run", experiment_name: str = "expportrait",
                 run_name: str | None = None, tracking_uri: str | None = None,
                 artifact_location: str | None = None, tags: dict | None = None,
                 log_model: bool = False, run_id: str | None = None) -> None:
        if tracking_uri is None:
            tracking_uri, default_artifacts = local_store(out_dir)
            artifact_location = artifact_location or default_artifacts
        super().__init__(experiment_name=experiment_name, run_name=run_name, tracking_uri=tracking_uri,
                         artifact_location=artifact_location, tags=tags, log_model=log_model, run_id=run_id)
        self.out_dir = out_dir
