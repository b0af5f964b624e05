"""MLflow logger with embedded defaults: an ``sqlite:///`` store and artifacts under the run's
output folder (``out_dir``); a server by ``tracking_uri`` (e.g. ``http://host:5000``), else by
``$MLFLOW_TRACKING_URI`` when it is set (a team's tracking server).

One run per training, across restarts: rank 0 writes the run it opened to ``OUT/mlflow_run.json``;
a resumed fit (``--ckpt_path``, a SLURM requeue, a restart after ``kill -9``) passes
``continue_run=True`` (``training.train`` does) and goes on logging into that run, set back to
``RUNNING`` and ended ``FINISHED`` by this process, instead of opening a second run and leaving the
killed one ``RUNNING`` with half the history."""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

RUN_FILE = "mlflow_run.json"


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
                 log_model: bool = False, run_id: str | None = None, continue_run: bool = False) -> None:
        tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
        if tracking_uri is None:
            tracking_uri, default_artifacts = local_store(out_dir)
            artifact_location = artifact_location or default_artifacts
        open_sqlite_store(tracking_uri)
        if run_id is None and continue_run:
            run_id = previous_run(out_dir, tracking_uri, experiment_name)
        super().__init__(experiment_name=experiment_name, run_name=run_name, tracking_uri=tracking_uri,
                         artifact_location=artifact_location, tags=tags, log_model=log_model, run_id=run_id)
        self.out_dir = out_dir
        self.continued = run_id is not None

    @property
    @rank_zero_experiment
    def experiment(self):
        """The MLflow client (rank 0); the first call opens the run (or reopens the continued
        one as ``RUNNING``) and records it in ``OUT/mlflow_run.json``."""
        opening = not self._initialized
        client = MLFlowLogger.experiment.fget(self)
        if opening:
            if self.continued:
                client.update_run(self._run_id, status="RUNNING")
            record = {"run_id": self._run_id, "tracking_uri": self._tracking_uri,
                      "experiment_name": self._experiment_name}
            path = Path(self.out_dir) / RUN_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record))
            tmp.replace(path)
        return client

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        """As the stock logger; in a continued run a parameter whose value changed (MLflow params
        are immutable: logging it again would fail the resume) is recorded as the tag
        ``resumed_param.<name>`` instead."""
        if not self.continued:
            return super().log_hyperparams(params)
        from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
        logged = self.experiment.get_run(self.run_id).data.params
        flat = {k: str(v)[:250] for k, v in _flatten_dict(_convert_params(params)).items()}
        changed = {k: v for k, v in flat.items() if k in logged and logged[k] != v}
        for key, value in changed.items():
            self.experiment.set_tag(self.run_id, f"resumed_param.{key}", value)
        super().log_hyperparams({k: v for k, v in flat.items() if k not in changed})


def previous_run(out_dir: str | Path, tracking_uri: str, experiment_name: str) -> str | None:
    """The run a training in ``out_dir`` opened before (``OUT/mlflow_run.json``), when it was in
    this tracking store and experiment; else None (a new run is opened)."""
    path = Path(out_dir) / RUN_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("tracking_uri") != tracking_uri or record.get("experiment_name") != experiment_name:
        return None
    return record.get("run_id")
