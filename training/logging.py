"""MLflow logger with embedded defaults: an ``sqlite:///`` store and artifacts under the run's
output folder (``out_dir``); a server by ``tracking_uri`` (e.g. ``http://host:5000``), else by
``$MLFLOW_TRACKING_URI`` when it is set (a team's tracking server)."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from lightning.pytorch.loggers import MLFlowLogger


def local_store(out_dir: str | Path) -> tuple[str, str]:
    """(tracking URI, artifact location) of the embedded store under ``out_dir``."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{out / 'mlflow.db'}", (out / "mlartifacts").as_uri()


def open_sqlite_store(tracking_uri: str) -> None:
    """Create (or migrate) an ``sqlite:///`` store once, under an exclusive lock beside the file:
    processes that open the same new store at once (the ranks of a multi-node launch, two
    trainings) wait for the first instead of racing MLflow's table creation, which leaves the
    file broken for good. Other URIs are left alone (a server creates its own store)."""
    if not tracking_uri.startswith("sqlite:///"):
        return
    import mlflow

    db = Path(tracking_uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            mlflow.MlflowClient(tracking_uri).search_experiments(max_results=1)   # creates the tables
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class LocalMLFlowLogger(MLFlowLogger):
    def __init__(self, out_dir: str = "outputs/train/run", experiment_name: str = "expportrait",
                 run_name: str | None = None, tracking_uri: str | None = None,
                 artifact_location: str | None = None, tags: dict | None = None,
                 log_model: bool = False, run_id: str | None = None) -> None:
        tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
        if tracking_uri is None:
            tracking_uri, default_artifacts = local_store(out_dir)
            artifact_location = artifact_location or default_artifacts
        open_sqlite_store(tracking_uri)
        super().__init__(experiment_name=experiment_name, run_name=run_name, tracking_uri=tracking_uri,
                         artifact_location=artifact_location, tags=tags, log_model=log_model, run_id=run_id)
        self.out_dir = out_dir
