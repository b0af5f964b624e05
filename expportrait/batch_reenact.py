"""Batch reenactment as a Ray job: a table of (source, driving) pairs -> one video per pair and a
manifest with a row per pair (``ok`` or ``failed`` with the reason); one bad pair never stops
the batch. Worker actors load the model once (a package folder or a ``models:/`` URI) and run
pairs one at a time on the jobs' actor-pool runtime (:mod:`pipelines.actor_pool`); an actor that
dies is reported as a failed row for its pair and replaced. (It loads registered models, so it
lives with the registry, above ``pipelines``.)

    expportrait reenact --model models:/expportrait@champion --pairs pairs.csv --out-dir DIR
        [--workers 2] [--address HOST:PORT] [--side-by-side] [--paste-back]

The table (csv or parquet) needs ``source`` and ``driving`` columns; ``out`` (a path) and
``name`` are optional (default ``DIR/videos/<row>_<source stem>__<driving stem>.mp4``).
``DIR/manifest.parquet`` and ``DIR/manifest.csv`` hold the rows.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pandas as pd

from pipelines.actor_pool import ActorPool, ActorResources, CallFailure
from pipelines.preprocess.config import RayConfig
from pipelines.preprocess.job import init_ray


class ReenactWorker:
    """A Ray actor holding one loaded model."""

    def __init__(self, model: str, tracking_uri: str | None, head_model: str | None, threads: int) -> None:
        import torch
        torch.set_num_threads(max(1, threads))
        if tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
            import mlflow
            mlflow.set_tracking_uri(tracking_uri)
            mlflow.set_registry_uri(tracking_uri)
        from expportrait.registry import load_reenactor
        self.reenactor, self.desc = load_reenactor(model, head_model)

    def ready(self) -> dict:
        return self.desc

    def run(self, row: dict, params: dict) -> dict:
        from expportrait.registry import run_pair
        return run_pair(self.reenactor, row, params)


def read_pairs(table: str | Path, out_dir: str | Path) -> pd.DataFrame:
    """The pairs table with an ``out`` path per row (see the module doc)."""
    table = Path(table)
    if not table.is_file():
        raise FileNotFoundError(f"pairs table not found: {table}")
    df = pd.read_parquet(table) if table.suffix == ".parquet" else pd.read_csv(table)
    missing = {"source", "driving"} - set(df.columns)
    if missing:
        raise ValueError(f"pairs table {table} lacks column(s) {sorted(missing)} (needs source, driving)")
    df = df.copy()
    if "out" not in df.columns:
        df["out"] = [str(Path(out_dir) / "videos" / f"{i:04d}_{Path(s).stem}__{Path(d).stem}.mp4")
                     for i, (s, d) in enumerate(zip(df["source"], df["driving"]))]
    return df


def run_batch(model: str, table: str | Path, out_dir: str | Path, workers: int = 1, params: dict | None = None,
              address: str | None = None, num_cpus: int | None = None, cpus_per_worker: float = 1.0,
              tracking_uri: str | None = None, head_model: str | None = None) -> dict:
    """Run every pair of ``table`` on Ray actors; write the manifest; return a summary."""
    import ray
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    df = read_pairs(table, out_dir)
    rows = df.to_dict("records")
    params = params or {}
    t0 = time.perf_counter()

    def failed_row(failure: CallFailure) -> dict:
        row, cause = failure.item, failure.cause
        return {"source": str(row["source"]), "driving": str(row["driving"]), "out": str(row["out"]),
                "status": "failed", "frames": 0, "seconds": 0.0,
                "message": f"{failure.status}: {type(cause).__name__}: {str(cause)[:500]}"}

    init_ray(RayConfig(address=address, num_cpus=num_cpus))
    try:
        pool = ActorPool(ReenactWorker, (model, tracking_uri, head_model, max(1, int(cpus_per_worker))),
                         ActorResources(num_cpus=cpus_per_worker, max_restarts=1, max_task_retries=0))
        pool.start(min(workers, len(rows)))                  # a model that cannot load stops here
        results = pool.map("run", rows, lambda row: (row, params), failed_row)
    finally:
        ray.shutdown()
    manifest = pd.DataFrame([{**{k: v for k, v in row.items() if k not in result}, **result}
                             for row, result in zip(rows, results)])
    manifest.to_parquet(out_dir / "manifest.parquet", index=False)
    manifest.to_csv(out_dir / "manifest.csv", index=False)
    ok = int((manifest["status"] == "ok").sum()) if len(manifest) else 0
    return {"pairs": len(manifest), "ok": ok, "failed": len(manifest) - ok,
            "manifest": str(out_dir / "manifest.parquet"), "seconds": round(time.perf_counter() - t0, 1)}
