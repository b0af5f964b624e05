"""The preprocessing job's driver: plan, run the pending shards on the worker pool, write the
manifest and summary. Clip logic lives in :mod:`preprocessing.clip_stages`, file formats in
:mod:`pipelines.job_io`, scheduling in :mod:`.scheduler`, the worker actor in :mod:`.workers`.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

from preprocessing import storage
from preprocessing.clip_records import ClipItem, is_environment_fault, one_line
from preprocessing.shard_format import MARKER_SUFFIX, ShardSpec, fingerprint, plan_shards

from ..job_io import (JobInputError, OutputDir, list_inputs, manifest_frame, parquet_bytes, retryable_clips,
                      write_if_changed)
from .config import ConfigError, PreprocessConfig, RayConfig
from .workers import FAULTS_ENV, ClipWorker, WorkerSpec

#: clips listed per shard in a dry run's plan (a million-clip plan is not printed whole)
DRY_RUN_SHARDS_SHOWN = 20


class EnvironmentFault(RuntimeError):
    """The machine, not the input: disk full, permission denied, read-only output, cluster
    unreachable. Exit code 3."""


class InternalError(RuntimeError):
    """A failure that is neither the input's nor the machine's (a bug). Exit code 4."""


def stage_fingerprint(cfg: PreprocessConfig, model_sha1: str, landmark_embedding: str = "none") -> str:
    """What a shard's content depends on besides its clips (``landmark_embedding``: the
    digest of the embedding file the setting resolved to, see :func:`check_landmark_embedding`).
    The fitter's settings enter resolved, defaults included: a resumed job refits when a
    default changed between releases, and an override equal to the default changes nothing."""
    from preprocessing.clip_records import fit_options_model
    fit = fit_options_model().model_validate(cfg.stages.fit).model_dump()
    return fingerprint(cfg.stages.model_dump(exclude={"fit"}), fit, cfg.subdivision, model_sha1, landmark_embedding)


def worker_threads(cfg: PreprocessConfig) -> int:
    """torch threads of a worker actor (``workers.torch_threads``, else its CPUs rounded)."""
    return cfg.workers.torch_threads or max(1, round(cfg.workers.num_cpus))


def check_head_model(cfg: PreprocessConfig) -> tuple[str, str]:
    """Load and check the head model once in the driver (also for a dry run): its path and
    sha1; :class:`ConfigError` naming the file and the problem."""
    from models.head.resolve import head_model_path
    from models.head.smplx_file import HeadModelFileError, load_smplx_model
    from preprocessing.files import file_digest

    path = cfg.head_model
    try:
        path = str(head_model_path(cfg.head_model).resolve())   # given, else $EXPPORTRAIT_SMPLX_PATH, else synthetic
        load_smplx_model(path)
    except (HeadModelFileError, FileNotFoundError) as exc:
        raise ConfigError(f"head_model: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - whatever a non-model file makes numpy raise
        raise ConfigError(f"head_model: {path} is not an SMPL-X-format .npz ({type(exc).__name__}: {exc})") from None
    return path, file_digest(path)


def check_landmark_embedding(cfg: PreprocessConfig, model_path: str) -> str:
    """Resolve ``stages.landmark_embedding`` for the model once in the driver: the digest of
    the embedding used ("none" for the model's own landmarks); :class:`ConfigError` if the file
    is unreadable or made for another model."""
    from models.head.smplx_file import load_smplx_model
    from preprocessing.landmark_embedding import resolve_embedding

    try:
        emb = resolve_embedding(cfg.stages.landmark_embedding, load_smplx_model(model_path))
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"stages.landmark_embedding: {exc}") from None
    return emb.digest() if emb is not None else "none"


def run(cfg: PreprocessConfig, dry_run: bool = False, progress: bool = True,
        retry_failed: bool = False) -> dict:
    """Run the job; returns the summary (also written to OUT/summary.json).

    Raises :class:`ConfigError` / :class:`JobInputError` (nothing ran) and
    :class:`EnvironmentFault` when the output cannot be used at all. A fault while clips run
    (a full disk, workers that cannot start) stops the job; the manifest and summary of what
    finished are still written and the summary's ``fault`` says what happened.
    ``retry_failed``: also redo done shards whose clips failed for reasons that are not the
    clip's (``worker_lost``, ``stage_error``)."""
    started, t_start = time.time(), time.perf_counter()
    model_path, model_sha1 = check_head_model(cfg)
    embedding = check_landmark_embedding(cfg, model_path)
    if embedding == "none" and cfg.stages.landmark_embedding == "auto":
        from preprocessing.landmark_embedding import no_calibration_note
        print(no_calibration_note(model_path, "stages.landmark_embedding"), file=sys.stderr)
    stage_fp = stage_fingerprint(cfg, model_sha1, embedding)
    items = reaching_storage("input", cfg.input, lambda: list_inputs(cfg.input, cfg.limit))
    if not items:
        raise JobInputError(f"no video found in {cfg.input}")
    plan = plan_shards(items, cfg.clips_per_shard, stage_fp)
    out = OutputDir(cfg.output)
    present = reaching_storage("output", out.root, lambda: set(storage.listdir(out.shards)))  # one listing
    done = {s.name: out.read_marker(s) for s in plan if f"{s.name}{MARKER_SUFFIX}" in present}
    if retry_failed:          # done shards holding lost or crashed clips are done again
        done = {k: m for k, m in done.items() if m is None or not retryable_clips(m)}
    pending = [s for s in plan if not done.get(s.name)]
    pending_items = [c for s in pending for c in s.clips]
    by_identity: dict[str, list[ClipItem]] = {}
    for item in items:
        by_identity.setdefault(item.identity_id, []).append(item)
    if dry_run:
        needed = sorted({c.identity_id for c in pending_items})
        return {"dry_run": True, "inputs": len(items), "shards": len(plan), "pending_shards": len(pending),
                "pending_clips": len(pending_items), "identities": len(by_identity),
                "identities_needed": len(needed), "head_model": model_path, "output": str(out.root),
                "seconds": round(time.perf_counter() - t_start, 3),
                "plan_head": [{"shard": s.name, "clips": [c.clip_id for c in s.clips],
                               "done": bool(done.get(s.name))} for s in plan[:DRY_RUN_SHARDS_SHOWN]]}
    try:
        with out.locked():
            orphans = out.prepare()
            stats = {"started": started, "orphans_removed": orphans,
                     "clips_processed": 0, "shards_written": 0, "identities_fitted": 0}
            fault = None
            if pending:
                try:
                    stats.update(_run_pending(cfg, out, pending, pending_items, by_identity,
                                              model_path, model_sha1, stage_fp, progress))
                except (EnvironmentFault, InternalError, ConfigError) as exc:
                    fault = exc
                except Exception as exc:  # noqa: BLE001 - stop, but keep what finished
                    fault = _as_fault(exc, out)
            return _finish(cfg, out, plan, by_identity, stage_fp, model_path, stats, t_start, fault, embedding)
    except OSError as exc:
        if is_environment_fault(exc):
            raise EnvironmentFault(f"output {out.root}: {exc.strerror or exc}"
                                   + (f" ({exc.filename})" if exc.filename else "")) from None
        raise


def _as_fault(exc: Exception, out: OutputDir) -> Exception:
    if is_environment_fault(exc):
        return EnvironmentFault(f"{exc.strerror or exc}: {exc.filename or out.root}")
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    return InternalError(one_line(exc))


def _finish(cfg: PreprocessConfig, out: OutputDir, plan: list[ShardSpec], by_identity: dict,
            stage_fp: str, model_path: str, stats: dict, t_start: float, fault: Exception | None,
            embedding: str = "none") -> dict:
    """Manifest, errors and summary from the done markers of the plan's shards (those that
    finished, also when a fault stopped the job)."""
    from preprocessing.clip_stages import stage_spec
    markers = [m for m in (out.read_marker(s) for s in plan) if m is not None]
    unfinished = len(plan) - len(markers)
    if unfinished and fault is None:              # only when a writer kept failing silently
        fault = InternalError(f"{unfinished} shard(s) without a done marker after the run")
    manifest = manifest_frame(markers)
    errors = manifest[manifest["status"] != "ok"].reset_index(drop=True)
    stats["seconds"] = round(time.perf_counter() - t_start, 3)
    failed = int((manifest["status"] != "ok").sum())
    summary = {
        "inputs": sum(len(s.clips) for s in plan), "finished": len(manifest),
        "ok": len(manifest) - failed, "failed": failed,
        "failure_ratio": round(failed / max(1, len(manifest)), 4),
        "max_failure_ratio": cfg.max_failure_ratio,
        "statuses": {k: int(v) for k, v in manifest["status"].value_counts().sort_index().items()},
        "samples": int(sum(m["samples"] for m in markers)),
        "complete": unfinished == 0,
        "unfinished_shards": unfinished,
        "shards": [{"name": m["name"], "tar": m["tar"], "samples": m["samples"], "sha256": m["sha256"],
                    "bytes": m["bytes"]} for m in markers],
        "identities": len(by_identity), "stage_fingerprint": stage_fp, "head_model": model_path,
        "landmark_embedding": embedding,                  # digest of the embedding used, or "none"
        "stages": cfg.stages.model_dump(mode="json"),
        "stage_spec": stage_spec(cfg.stages, model_path, cfg.subdivision, worker_threads(cfg)),   # packed whole
        "output": output_location(out.root), "last_run": stats,
    }
    if fault is not None:
        summary["fault"] = {"error": type(fault).__name__, "message": str(fault)}
    try:
        stats["manifest_written"] = write_if_changed(storage.url_join(out.root, "manifest.parquet"),
                                                     parquet_bytes(manifest))
        stats["errors_written"] = write_if_changed(storage.url_join(out.root, "errors.parquet"), parquet_bytes(errors))
        storage.put_bytes(storage.url_join(out.root, "summary.json"), json.dumps(summary, indent=1).encode())
    except OSError as exc:
        if not is_environment_fault(exc) and fault is None:
            raise
        stats["manifest_written"] = False
        summary.setdefault("fault", {"error": "EnvironmentFault", "message": ""})
        summary["fault"]["message"] += (f"; the manifest and summary could not be written either "
                                        f"({exc.strerror or exc})")
    return summary


def _run_pending(cfg: PreprocessConfig, out: OutputDir, pending: list[ShardSpec],
                 pending_items: list[ClipItem], by_identity: dict,
                 model_path: str, model_sha1: str, stage_fp: str, progress: bool) -> dict:
    from tqdm import tqdm

    from .scheduler import Scheduler, WorkerPool, WorkerSetupError

    t0 = time.perf_counter()
    mode = init_ray(cfg.ray)                      # first: it sets what `import ray` reads
    import ray
    ray_init_seconds = time.perf_counter() - t0
    pool = None
    try:
        w = cfg.workers
        spec = WorkerSpec(model_path=model_path, model_sha1=model_sha1, stages=cfg.stages,
                          subdivision=cfg.subdivision, threads=worker_threads(cfg),
                          clip_retries=w.clip_retries, fault_dir=fault_flags_dir(out.root),
                          faults=test_faults())
        # A dead worker process: Ray restarts the actor, the scheduler runs the call again on
        # a live worker (max_retries; Ray's own max_task_retries answers ActorUnavailableError
        # for a process that died mid-call); an exception raised by the code is not retried.
        actor_class = ray.remote(ClipWorker).options(num_cpus=w.num_cpus, num_gpus=w.num_gpus,
                                                     max_restarts=-1, max_task_retries=0)
        pool = WorkerPool(ray, actor_class, spec, w, autoscale=mode == "cluster")   # spec by value: restarts need it
        bar = tqdm(total=len(pending_items), desc="clips", unit="clip", disable=not progress,
                   file=sys.stdout, mininterval=1.0)
        sched = Scheduler(ray, pool, out, stage_fp, pending, by_identity, cfg.clips_per_shard,
                          w.max_pending_shards, bar, max_retries=w.max_retries)
        try:
            while sched.busy:
                sched.fill()
                sched.step()
        except WorkerSetupError as exc:
            raise ConfigError(str(exc)) from None
        finally:
            bar.close()
        if sched.fault is not None:
            if is_environment_fault(sched.fault):
                f = sched.fault
                where = f": {f.filename}" if getattr(f, "filename", None) else ""
                raise EnvironmentFault(f"{f.strerror or f}{where}")
            raise InternalError(f"a shard writer failed: {type(sched.fault).__name__}: {sched.fault}")
        return {"ray_init_seconds": round(ray_init_seconds, 3),
                "process_seconds": round(time.perf_counter() - t0 - ray_init_seconds, 3), "mode": mode,
                "nodes": node_addresses(), "clips_processed": len(pending_items),
                "shards_written": sched.written, "identities_fitted": sched.fitted,
                "workers": pool.slots}
    finally:
        if pool is not None:
            pool.shutdown()
        ray.shutdown()


def reaching_storage(role: str, location: str, call):
    """``call()``; an object store that cannot be reached or refuses the credentials (an
    ``OSError`` from the S3 client) is an :class:`EnvironmentFault` naming the URL, not a bug.
    The message is the client's: it names the bucket and key, never the credentials."""
    try:
        return call()
    except OSError as exc:
        if storage.local_path(location) is not None and not is_environment_fault(exc):
            raise
        if storage.local_path(location) is not None:
            raise EnvironmentFault(f"{role} {location}: {exc.strerror or exc}") from None
        raise EnvironmentFault(f"{role} {location}: the object store cannot be used "
                               f"({' '.join(str(exc).split())[:300]})") from None


def output_location(root: str) -> str:
    """The output as the summary names it: a URL as given (it holds no credentials: those come
    from the environment), a path made absolute."""
    local = storage.local_path(root)
    return root if local is None else os.path.abspath(local)


def fault_flags_dir(root: str) -> str:
    """Where the test hook's one-shot flags go: ``OUT/_faults`` on a local output, a folder in
    the temp dir named after the URL otherwise (the flags need an atomic local create)."""
    import hashlib
    import tempfile

    local = storage.local_path(root)
    if local is not None:
        return os.path.join(local, "_faults")
    return os.path.join(tempfile.gettempdir(), "expportrait-faults-" + hashlib.sha1(root.encode()).hexdigest()[:12])


def test_faults() -> dict:
    """The test hook's faults (``EXPPORTRAIT_TEST_FAULTS``, JSON); empty in normal runs."""
    raw = os.environ.get(FAULTS_ENV)
    return json.loads(raw) if raw else {}


def init_ray(cfg: RayConfig) -> str:
    """Join the configured cluster, else start an embedded Ray bound to loopback;
    :class:`EnvironmentFault` when the cluster cannot be reached."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if not address:
        # Embedded: keep every Ray socket on loopback (read when ray is imported; measured in
        # ../shared/deps-notes.md). It also forbids other nodes joining, which is what we want.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    try:
        if address:
            _check_reachable(address)
            ray.init(address=address, log_to_driver=cfg.log_to_driver)
            return "cluster"
        kwargs = dict(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, include_dashboard=cfg.include_dashboard,
                      dashboard_host=cfg.dashboard_host, log_to_driver=cfg.log_to_driver)
        if cfg.dashboard_port:
            kwargs["dashboard_port"] = cfg.dashboard_port
        if cfg.object_store_mb:
            kwargs["object_store_memory"] = int(cfg.object_store_mb) << 20
        ray.init(**kwargs)
        return "embedded"
    except (ConnectionError, TimeoutError, RuntimeError, OSError) as exc:
        where = f"the Ray cluster at {address}" if address else "an embedded Ray"
        raise EnvironmentFault(f"cannot reach {where}: {type(exc).__name__}: "
                               f"{' '.join(str(exc).split())[:300]}") from None


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail fast on a GCS address nothing answers on (``ray.init`` itself retries for minutes).
    ``auto`` and ``ray://`` client addresses are left to Ray."""
    import socket

    if address in ("auto", "local") or "://" in address or ":" not in address:
        return
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout):
        pass


def node_addresses() -> list[str]:
    import ray
    return sorted(n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive"))
