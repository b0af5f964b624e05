"""The preprocessing job: talking-head videos -> WebDataset shards + parquet manifests.

    python -m pipelines.preprocess --config configs/preprocess/local.yaml [--input DIR|MANIFEST]
        [--output DIR] [--limit N] [--dry-run] [--retry-failed] [--address RAY_ADDRESS]

Without an address (``--address``, ``ray.address`` in the config or ``RAY_ADDRESS``) it starts
an embedded Ray on this machine, bound to loopback; with one it joins that cluster. The same
command runs under ``ray job submit --working-dir . -- python -m pipelines.preprocess ...``.

The driver only composes the pure stages of :mod:`preprocessing.clip_stages` as Ray tasks:

    identity task (per identity: β, Δg from its first usable clip)
      └─► clip tasks (decode -> track -> fit -> render -> encode), resources from the config
            └─► shard task (write <split>-<k>.tar + done marker)      ... per planned shard

A bad clip is a status row; a killed worker is retried by Ray (``max_retries``); a crashing
stage is retried ``clip_retries`` times before it becomes a ``stage_error`` row. Reruns skip
shards whose done marker matches the plan. Exit status: 0, 1 when the failure ratio passes
``max_failure_ratio``, 2 for a bad configuration or input.
"""
from __future__ import annotations

import argparse
import heapq
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Callable

from preprocessing.clip_records import (ClipItem, ClipOutcome, IdentityFit, StageConfig,
                                        identity_failure_outcome)

from .job_io import (JobInputError, OutputDir, ShardSpec, fingerprint, list_inputs, manifest_frame,
                     parquet_bytes, plan_shards, retryable_clips, write_if_changed, write_shard)


# -- configuration ------------------------------------------------------------------------

@dataclass
class RayConfig:
    address: str | None = None            # None: $RAY_ADDRESS, else an embedded local Ray
    num_cpus: int | None = None           # embedded Ray only (None: all cores)
    num_gpus: int | None = None
    object_store_mb: int | None = 512     # embedded Ray only
    include_dashboard: bool | None = False
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int | None = None
    log_to_driver: bool = False           # workers' stdout (MediaPipe, TF Lite) is noisy


@dataclass
class WorkerConfig:
    num_cpus: float = 1.0                 # per clip task
    num_gpus: float = 0.0                 # GPUs reserved per clip task (the fitter is CPU-only so far)
    torch_threads: int | None = None      # None: num_cpus rounded (at least 1)
    max_retries: int = 3                  # Ray re-runs a task whose worker process died
    clip_retries: int = 1                 # a stage that raised is retried this often in place
    max_pending_shards: int | None = None  # shards open at once (None: 2 + worker slots / clips per shard)
    queue_depth: int = 1                  # tasks queued in Ray beyond the free workers (an
    #                                       autoscaler adds nodes for queued tasks: raise it there)
    writer_num_cpus: float = 1.0          # per shard writer task: it starts once its clips are done
    #                                       and so runs in a warm worker process (torch imported)


@dataclass
class PreprocessConfig:
    input: str | None = None
    output: str = "outputs/preprocess"
    limit: int | None = None
    head_model: str | None = None          # SMPL-X-format .npz; None: the synthetic model
    subdivision: int = 1
    clips_per_shard: int = 8
    max_failure_ratio: float = 0.5
    stages: StageConfig = field(default_factory=StageConfig)
    workers: WorkerConfig = field(default_factory=WorkerConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    fault_injection: dict = field(default_factory=dict)   # tests only: kill_worker / crash_stage


class ConfigError(ValueError):
    pass


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; known: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        default = known[name].default_factory() if callable(known[name].default_factory) else None
        kwargs[name] = _build(type(default), value, f"{where}.{name}") if is_dataclass(default) else value
    return cls(**kwargs)


def load_config(path: str | os.PathLike | None, overrides: dict | None = None) -> PreprocessConfig:
    import yaml

    data = {}
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config {path} not found")
        data = yaml.safe_load(Path(path).read_text()) or {}
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    cfg = _build(PreprocessConfig, data, "config")
    if cfg.input is None:
        raise ConfigError("no input: set `input:` in the config or pass --input")
    if cfg.clips_per_shard < 1 or not 0 <= cfg.max_failure_ratio <= 1:
        raise ConfigError("clips_per_shard must be >= 1 and max_failure_ratio in [0, 1]")
    return cfg


def stage_fingerprint(cfg: PreprocessConfig, model_sha1: str) -> str:
    """What a shard's content depends on besides its clips."""
    return fingerprint(cfg.stages, cfg.subdivision, model_sha1)


# -- Ray tasks ----------------------------------------------------------------------------

_CONTEXTS: dict = {}


def _context(model_path: str, model_sha1: str, stages: StageConfig, subdivision: int, threads: int):
    """One StageContext per worker process (models load once, tasks reuse them)."""
    key = (model_path, json.dumps(asdict(stages), sort_keys=True), subdivision)
    if key not in _CONTEXTS:
        import cv2
        import torch

        from preprocessing.clip_stages import StageContext
        torch.set_num_threads(threads)            # a task uses the CPUs it reserved, no more
        cv2.setNumThreads(threads)
        _CONTEXTS.clear()
        _CONTEXTS[key] = StageContext(model_path, stages, subdivision, model_sha1)
    return _CONTEXTS[key]


def _fire_once(fault_dir: str, kind: str, clip_id: str, faults: dict) -> bool:
    """Test-only fault injection: True the first time ``kind`` hits ``clip_id`` in this output."""
    if clip_id not in (faults.get(kind) or []):
        return False
    flag = Path(fault_dir) / f"{kind}-{clip_id}"
    flag.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def _attempt(item: ClipItem, spec: dict, work: Callable[[], ClipOutcome]) -> ClipOutcome:
    """One clip's stages under the job's guards: a stage that raised (``stage_error``) is
    retried in place ``clip_retries`` times; test-only faults (kill_worker, crash_stage)."""
    import ray

    started_at = time.time()
    faults, fault_dir = spec["faults"], spec["fault_dir"]
    if _fire_once(fault_dir, "kill_worker", item.clip_id, faults):
        os.kill(os.getpid(), 9)                      # as if the node's OOM killer struck
    for attempt in range(1 + spec["clip_retries"]):
        if _fire_once(fault_dir, "crash_stage", item.clip_id, faults):
            outcome = ClipOutcome(item.clip_id, item.identity_id, item.split, item.path,
                                  status="stage_error", stage="process", reason="injected crash")
        else:
            outcome = work()
        if outcome.status != "stage_error":
            break
    outcome.attempts = attempt + 1
    outcome.node = ray.util.get_node_ip_address()
    if not outcome.started_at:
        outcome.started_at, outcome.finished_at = started_at, time.time()
    return outcome


def identity_task(identity_id: str, items: list[ClipItem], spec: dict):
    """Three returns: the identity, the outcomes of clips that failed as anchor candidates
    (small) and the anchor clip's final outcome (its samples: fetched only by its writer)."""
    from preprocessing.clip_stages import fit_identity, run_clip

    ctx = _context(**spec["context"])
    identity, tried = fit_identity(identity_id, items, ctx,
                                   run=lambda item: _attempt(item, spec, lambda: run_clip(item, ctx)))
    anchor = tried.pop(identity.anchor_clip_id, None) if identity.anchor_clip_id else None
    return identity, tried, anchor


def clip_task(item: ClipItem, identity: IdentityFit, spec: dict) -> ClipOutcome:
    """A clip of an identity that is already fitted (β and Δg fixed)."""
    from preprocessing.clip_stages import process_clip

    ctx = _context(**spec["context"])
    return _attempt(item, spec, lambda: process_clip(item, identity, ctx))


def shard_task(out_root: str, shard: ShardSpec, clip_refs: list) -> dict:
    """Write one shard once its clips are done. The refs arrive nested (unresolved), so a
    clip whose task failed for good (its worker died on every retry) becomes a status row."""
    import ray

    outcomes = []
    for item, ref in zip(shard.clips, clip_refs):
        try:
            outcomes.append(ray.get(ref))
        except Exception as exc:  # noqa: BLE001 - RayTaskError, WorkerCrashedError, ...
            outcomes.append(_lost(item, exc))
    return write_shard(OutputDir(out_root), shard, outcomes)


def _lost(item: ClipItem, exc: BaseException) -> ClipOutcome:
    return ClipOutcome(item.clip_id, item.identity_id, item.split, item.path, status="worker_lost",
                       stage="worker", reason=f"{type(exc).__name__}: {str(exc)[:800]}")


class _Scheduler:
    """Feeds the cluster in plan order with the critical path first.

    * At most ``window`` shards are *open* (admitted, not yet written), so finished samples
      waiting in the object store stay bounded; a shard's writer task starts once all its
      outcomes are in (none sits blocked on unfinished clips).
    * Work reaches Ray only as workers free up (``slots`` tasks running plus ``queue_depth``
      queued; the cluster's size is read again every few seconds, so an autoscaled cluster
      gets more, and a deeper queue is what makes an autoscaler add nodes), from
      a queue where identity fits come first: an identity's other clips wait on its anchor,
      so fitting identities early (also those of the next ``window`` shards, not yet open)
      keeps every worker busy instead of leaving anchor-then-clip chains to the end.
    * Clips need no task when the identity fit already gave their outcome (the anchor, failed
      anchor candidates) or when their identity failed (the row is written as it is).
    """

    def __init__(self, tasks: dict, spec_ref, out: OutputDir, stage_fp: str, pending: list[ShardSpec],
                 by_identity: dict[str, list[ClipItem]], workers: WorkerConfig, clips_per_shard: int,
                 bar, ray=None) -> None:
        if ray is None:                # (tests pass a stand-in)
            import ray

        self.ray, self.tasks, self.spec_ref, self.out, self.stage_fp = ray, tasks, spec_ref, out, stage_fp
        self.queue, self.by_identity, self.bar = list(pending), by_identity, bar
        self.workers, self.clips_per_shard = workers, clips_per_shard
        self.slots = self.window = 0
        self._sized_at = -1e9
        self.pending_ids = {c.clip_id for s in pending for c in s.clips}
        self.node = ray.util.get_node_ip_address()
        self.ready: list[tuple] = []   # heap of (priority, seq, kind, args): identity fits (0) first
        self.seq = 0
        self.running: dict = {}        # compute task ref -> ("identity", id, refs) | ("clip", shard, clip)
        self.started: set[str] = set()   # identities queued, running or known
        self.known: dict = {}          # identity id -> (IdentityFit or the task's error, its ref,
        #                                failed candidates' outcomes, anchor outcome ref)
        self.waiting: dict[str, list[tuple[str, ClipItem]]] = {}   # identity id -> open shards' clips
        self.shards: dict[str, ShardSpec] = {}                     # open shards
        self.outcomes: dict[str, dict] = {}                        # shard -> clip id -> outcome ref
        self.unresolved: dict = {}     # outcome ref -> shard name
        self.writes: dict = {}         # writer ref -> shard name
        self.written = self.fitted = 0

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.shards)

    def _size(self) -> None:
        """Worker slots of the cluster now (clip tasks that fit at once) and the open-shard
        window that keeps them busy (``max_pending_shards`` if set)."""
        if time.monotonic() - self._sized_at < 5.0:
            return
        self._sized_at = time.monotonic()
        res, w = self.ray.cluster_resources(), self.workers
        slots = res.get("CPU", 1) // max(w.num_cpus, 1e-3)
        if w.num_gpus:
            slots = min(slots, res.get("GPU", 0) // w.num_gpus)
        self.slots = max(1, int(slots), self.slots)
        self.window = w.max_pending_shards or 2 + -(-self.slots // self.clips_per_shard)

    # -- planning ------------------------------------------------------------------------
    def fill(self) -> None:
        """Open shards up to the window, start identity fits for those and the next window's
        shards, and hand queued work to Ray while workers are free."""
        self._size()
        while self.queue and len(self.shards) < self.window:
            self._open(self.queue.pop(0))
        for shard in self.queue[:self.window]:            # look ahead: fit identities early
            for clip in shard.clips:
                self._start_identity(clip.identity_id)
        while self.ready and len(self.running) < self.slots + self.workers.queue_depth:
            _, _, kind, args = heapq.heappop(self.ready)
            if kind == "identity":
                refs = self.tasks["identity"].remote(args, self.by_identity[args], self.spec_ref)
                self.running[refs[0]] = ("identity", args, refs)
            else:
                name, clip, fit_ref = args
                ref = self.tasks["clip"].remote(clip, fit_ref, self.spec_ref)
                self.running[ref] = ("clip", name, clip)
                self.outcomes[name][clip.clip_id] = ref
                self.unresolved[ref] = name

    def _push(self, priority: int, kind: str, args) -> None:
        heapq.heappush(self.ready, (priority, self.seq, kind, args))
        self.seq += 1

    def _open(self, shard: ShardSpec) -> None:
        self.shards[shard.name], self.outcomes[shard.name] = shard, {}
        for clip in shard.clips:
            self._start_identity(clip.identity_id)
            if clip.identity_id in self.known:
                self._assign(shard.name, clip)
            else:
                self.waiting.setdefault(clip.identity_id, []).append((shard.name, clip))

    def _start_identity(self, iid: str) -> None:
        if iid in self.started:
            return
        self.started.add(iid)
        # A saved identity is reused unless its anchor clip is pending: the anchor's outcome
        # comes from the identity fit itself, so a rerun reproduces it exactly.
        saved = self.out.load_identity(iid, self.stage_fp)
        if saved is not None and saved.anchor_clip_id not in self.pending_ids:
            self.known[iid] = (saved, self.ray.put(saved), {}, None)
        else:
            self._push(0, "identity", iid)

    def _assign(self, name: str, clip: ClipItem) -> None:
        """The outcome of an open shard's clip whose identity is known: a task, or at once."""
        fit, fit_ref, tried, anchor_ref = self.known[clip.identity_id]
        if isinstance(fit, BaseException):
            ref = self._row(_lost(clip, fit))
        elif clip.clip_id == fit.anchor_clip_id and anchor_ref is not None:
            ref = anchor_ref
        elif clip.clip_id in tried:
            ref = self.ray.put(tried[clip.clip_id])
        elif fit.status != "ok":
            ref = self._row(identity_failure_outcome(clip, fit))
        else:
            self._push(1, "clip", (name, clip, fit_ref))
            return
        self.outcomes[name][clip.clip_id] = ref
        self.unresolved[ref] = name

    def _row(self, outcome: ClipOutcome):
        outcome.node = self.node
        outcome.started_at = outcome.finished_at = time.time()
        return self.ray.put(outcome)

    # -- reacting ------------------------------------------------------------------------
    def step(self, timeout: float = 1.0) -> None:
        """Wait (up to ``timeout``) for anything to finish, then react to all that has."""
        watch = list(self.running) + [r for r in self.unresolved if r not in self.running] + list(self.writes)
        if not watch:
            return
        first, _ = self.ray.wait(watch, num_returns=1, timeout=timeout, fetch_local=False)
        if not first:
            return
        ready, _ = self.ray.wait(watch, num_returns=len(watch), timeout=0, fetch_local=False)
        for ref in ready:
            task = self.running.pop(ref, None)
            if task is not None and task[0] == "identity":
                self._identity_done(task[1], task[2])
                continue
            if ref in self.unresolved:
                name = self.unresolved.pop(ref)
                self.bar.update(1)
                self._maybe_write(name)
            elif ref in self.writes:
                name = self.writes.pop(ref)
                self.ray.get(ref)             # raises if the writer failed for good
                del self.shards[name], self.outcomes[name]
                self.written += 1

    def _identity_done(self, iid: str, refs: list) -> None:
        fit_ref, tried_ref, anchor_ref = refs
        try:
            fit, tried = self.ray.get([fit_ref, tried_ref])
        except Exception as exc:  # noqa: BLE001 - its worker died on every retry
            fit, tried, anchor_ref = exc, {}, None
        if isinstance(fit, IdentityFit) and fit.status == "ok":
            self.out.save_identity(fit, self.stage_fp)
            self.fitted += 1
        self.known[iid] = (fit, fit_ref, tried, anchor_ref)
        for name, clip in self.waiting.pop(iid, []):
            self._assign(name, clip)

    def _maybe_write(self, name: str) -> None:
        shard, refs = self.shards[name], self.outcomes[name]
        if len(refs) == len(shard.clips) and not any(r in self.unresolved for r in refs.values()):
            ref = self.tasks["write"].remote(str(self.out.root), shard, [refs[c.clip_id] for c in shard.clips])
            self.writes[ref] = name


# -- driver -------------------------------------------------------------------------------

def _init_ray(cfg: RayConfig):
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if not address:
        # Embedded: keep every Ray socket on loopback (read when ray is imported; measured in
        # ../shared/deps-notes.md). It also forbids other nodes joining, which is what we want.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if address:
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


def run(cfg: PreprocessConfig, dry_run: bool = False, progress: bool = True,
        retry_failed: bool = False) -> dict:
    """Run the job; returns the summary (also written to OUT/summary.json).

    ``retry_failed``: also redo the done shards whose clips failed for reasons that are not
    the clip's (``worker_lost``, ``stage_error``); other failures are final for a config."""
    from expportrait.assets import synthetic_model_file
    from preprocessing.files import file_digest

    started = time.time()
    t_start = time.perf_counter()
    model_path = str(Path(cfg.head_model).resolve()) if cfg.head_model else str(synthetic_model_file())
    if not Path(model_path).is_file():
        raise ConfigError(f"head model {model_path} not found")
    model_sha1 = file_digest(model_path)
    stage_fp = stage_fingerprint(cfg, model_sha1)
    items = list_inputs(cfg.input, cfg.limit)
    if not items:
        raise JobInputError(f"no video found in {cfg.input}")
    plan = plan_shards(items, cfg.clips_per_shard, stage_fp)
    out = OutputDir(cfg.output)
    done = {s.name: out.read_marker(s) for s in plan} if out.shards.is_dir() else {}
    if retry_failed:          # done shards holding lost or crashed clips are done again
        done = {k: m for k, m in done.items() if m is None or not retryable_clips(m)}
    pending = [s for s in plan if not done.get(s.name)]
    pending_items = [c for s in pending for c in s.clips]
    by_identity: dict[str, list[ClipItem]] = {}
    for item in items:
        by_identity.setdefault(item.identity_id, []).append(item)
    needed = sorted({c.identity_id for c in pending_items})
    if dry_run:
        return {"dry_run": True, "inputs": len(items), "shards": len(plan), "pending_shards": len(pending),
                "pending_clips": len(pending_items), "identities": len(by_identity),
                "identities_needed": needed, "output": str(out.root),
                "plan": [{"shard": s.name, "clips": [c.clip_id for c in s.clips],
                          "done": bool(done.get(s.name))} for s in plan]}

    with out.locked():
        orphans = out.prepare()
        run_stats = {"started": started, "orphans_removed": [p.name for p in orphans],
                     "clips_processed": 0, "shards_written": 0, "identities_fitted": 0}
        if pending:
            run_stats.update(_run_pending(cfg, out, pending, pending_items, by_identity,
                                          model_path, model_sha1, stage_fp, progress))
        markers = [out.read_marker(s) for s in plan]
        missing = [s.name for s, m in zip(plan, markers) if m is None]
        if missing:                                   # only when a shard task itself kept failing
            raise RuntimeError(f"shards without a done marker after the run: {missing}")
        manifest = manifest_frame(markers)
        errors = manifest[manifest["status"] != "ok"].reset_index(drop=True)
        run_stats["manifest_written"] = write_if_changed(out.root / "manifest.parquet", parquet_bytes(manifest))
        run_stats["errors_written"] = write_if_changed(out.root / "errors.parquet", parquet_bytes(errors))
        run_stats["seconds"] = round(time.perf_counter() - t_start, 3)
        failed = int((manifest["status"] != "ok").sum())
        summary = {
            "inputs": len(manifest), "ok": len(manifest) - failed, "failed": failed,
            "failure_ratio": round(failed / max(1, len(manifest)), 4),
            "max_failure_ratio": cfg.max_failure_ratio,
            "statuses": {k: int(v) for k, v in manifest["status"].value_counts().sort_index().items()},
            "samples": int(sum(m["samples"] for m in markers)),
            "shards": [{"name": m["name"], "tar": m["tar"], "samples": m["samples"], "sha256": m["sha256"],
                        "bytes": m["bytes"]} for m in markers],
            "identities": len(by_identity), "stage_fingerprint": stage_fp, "head_model": model_path,
            "output": str(out.root.resolve()), "last_run": run_stats,
        }
        (out.root / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _run_pending(cfg: PreprocessConfig, out: OutputDir, pending: list[ShardSpec],
                 pending_items: list[ClipItem], by_identity: dict,
                 model_path: str, model_sha1: str, stage_fp: str, progress: bool) -> dict:
    from tqdm import tqdm

    t0 = time.perf_counter()
    mode = _init_ray(cfg.ray)                     # first: it sets what `import ray` reads
    import ray
    ray_init_seconds = time.perf_counter() - t0
    try:
        threads = cfg.workers.torch_threads or max(1, int(round(cfg.workers.num_cpus)))
        spec = {"context": {"model_path": model_path, "model_sha1": model_sha1, "stages": cfg.stages, "subdivision": cfg.subdivision,
                            "threads": threads},
                "clip_retries": cfg.workers.clip_retries, "faults": cfg.fault_injection,
                "fault_dir": str(out.root / "_faults")}
        spec_ref = ray.put(spec)
        resources = {"num_cpus": cfg.workers.num_cpus, "num_gpus": cfg.workers.num_gpus,
                     "max_retries": cfg.workers.max_retries}
        tasks = {"identity": ray.remote(identity_task).options(num_returns=3, **resources),
                 "clip": ray.remote(clip_task).options(**resources),
                 "write": ray.remote(shard_task).options(num_cpus=cfg.workers.writer_num_cpus,
                                                         max_retries=cfg.workers.max_retries)}
        bar = tqdm(total=len(pending_items), desc="clips", unit="clip", disable=not progress,
                   file=sys.stdout, mininterval=1.0)
        sched = _Scheduler(tasks, spec_ref, out, stage_fp, pending, by_identity, cfg.workers,
                           cfg.clips_per_shard, bar)
        while sched.busy:
            sched.fill()
            sched.step()
        bar.close()
        return {"ray_init_seconds": round(ray_init_seconds, 3),
                "process_seconds": round(time.perf_counter() - t0 - ray_init_seconds, 3), "mode": mode,
                "nodes": _node_addresses(), "clips_processed": len(pending_items),
                "shards_written": sched.written, "identities_fitted": sched.fitted,
                "workers": sched.slots}
    finally:
        ray.shutdown()


def _node_addresses() -> list[str]:
    import ray
    return sorted(n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive"))


# -- command line -------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.preprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (see configs/preprocess/local.yaml)")
    p.add_argument("--input", help="folder of videos or manifest (.parquet/.csv)")
    p.add_argument("--output", help="output folder")
    p.add_argument("--limit", type=int, help="only the first N clips (sorted by clip id)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else embedded)")
    p.add_argument("--dry-run", action="store_true", help="print the plan; run and write nothing")
    p.add_argument("--retry-failed", action="store_true",
                   help="also redo done shards with worker_lost / stage_error clips")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, {"input": args.input, "output": args.output, "limit": args.limit})
        if args.address:
            cfg.ray.address = args.address
        summary = run(cfg, dry_run=args.dry_run, progress=not args.no_progress,
                      retry_failed=args.retry_failed)
    except (ConfigError, JobInputError) as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
        return 2
    if args.dry_run:
        print(json.dumps(summary))
        return 0
    brief = {k: summary[k] for k in ("inputs", "ok", "failed", "failure_ratio", "samples", "statuses", "output")}
    brief["shards"] = len([s for s in summary["shards"] if s["tar"]])
    brief["last_run"] = {k: summary["last_run"].get(k) for k in
                         ("mode", "nodes", "clips_processed", "shards_written", "seconds")}
    if summary["failure_ratio"] > cfg.max_failure_ratio:
        brief["error"] = (f"failure ratio {summary['failure_ratio']:.2f} is above max_failure_ratio "
                          f"{cfg.max_failure_ratio:.2f}; see {summary['output']}/errors.parquet")
        print(json.dumps(brief))
        return 1
    print(json.dumps(brief))
    return 0


if __name__ == "__main__":
    # Run from the importable module, not ``__main__``: Ray pickles ``__main__`` functions by
    # value, each with its own copy of the globals, so every task function would build its
    # own StageContext in a worker (measured: ~1.5 s more per worker and task kind).
    from pipelines import preprocess

    sys.exit(preprocess.main())
