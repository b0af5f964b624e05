"""The preprocessing job's worker: a Ray actor that loads the head model, tracker and fitter
once and then runs the pure stages of :mod:`preprocessing.clip_stages` on clip after clip
(and writes shards: it has everything imported, so a writer costs no process start).

Failure classes (what a manifest row says):

* a stage that raised a deterministic error: ``stage_error``, ``reason`` = the exception type
  and a clean one-line message; not retried (it would fail the same way);
* a transient error (:func:`is_transient`: connection resets, timeouts, I/O errors that come
  and go): retried in place ``clip_retries`` times, seconds summed over the attempts;
* a worker process that died (OOM killer, segfault, a lost node): Ray restarts the actor and
  re-runs the call ``max_retries`` times; a clip that keeps killing it is ``worker_lost``
  (see :func:`outcome_of_failure`, used by the driver and the writer).

Test hook (never in the user's config): the driver reads ``EXPPORTRAIT_TEST_FAULTS``, a JSON
object ``{kind: [clip ids or shard names]}`` with kinds ``kill_worker`` (once),
``kill_worker_always``, ``transient_error`` (once), ``stage_error`` (every time) and
``writer_enospc`` (shard names or ``"*"``); one-shot faults leave a flag in ``OUT/_faults``.
"""
from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..actor_pool import classify_call_error

from preprocessing.clip_records import (ClipItem, ClipOutcome, IdentityFit, StageConfig, is_transient,
                                        one_line)

FAULTS_ENV = "EXPPORTRAIT_TEST_FAULTS"
@dataclass
class WorkerSpec:
    """What every worker actor is built from (one object, put in the store once)."""

    model_path: str
    model_sha1: str
    stages: StageConfig
    subdivision: int
    threads: int
    clip_retries: int
    fault_dir: str
    faults: dict = field(default_factory=dict)    # test hook, from FAULTS_ENV


class ClipWorker:
    """One per worker slot (``ray.remote(ClipWorker)`` in the driver): builds the
    :class:`~preprocessing.clip_stages.StageContext` once, then serves calls one at a time."""

    def __init__(self, spec: WorkerSpec) -> None:
        import cv2
        import torch

        from preprocessing.clip_stages import StageContext

        torch.set_num_threads(spec.threads)           # the actor uses the CPUs it reserved
        cv2.setNumThreads(spec.threads)
        self.spec = spec
        self.ctx = StageContext(spec.model_path, spec.stages, spec.subdivision, spec.model_sha1)

    def ready(self) -> str:
        import ray
        return ray.util.get_node_ip_address()

    def fit_identity(self, identity_id: str, items: list[ClipItem], lost: int = 0):
        """Three returns: the identity, the outcomes of clips that failed as anchor candidates
        (small) and the anchor clip's final outcome (its samples: fetched only by its writer).
        ``lost``: earlier runs of this call whose worker died (counted in ``attempts``)."""
        from preprocessing.clip_stages import fit_identity, run_clip

        def run(item: ClipItem) -> ClipOutcome:
            return self._attempt(item, lambda: on_local_disk(item, lambda it: run_clip(it, self.ctx)), lost)

        identity, tried = fit_identity(identity_id, items, self.ctx, run=run)
        anchor = tried.pop(identity.anchor_clip_id, None) if identity.anchor_clip_id else None
        return identity, tried, anchor

    def process_clip(self, item: ClipItem, identity: IdentityFit, lost: int = 0) -> tuple[ClipOutcome, str]:
        """A clip of an identity that is already fitted (β and Δg fixed). Two returns: the
        outcome (with its samples, fetched by the writer) and its status (what the driver
        fetches)."""
        from preprocessing.clip_stages import process_clip

        outcome = self._attempt(item, lambda: on_local_disk(item, lambda it: process_clip(it, identity, self.ctx)),
                                lost)
        return outcome, outcome.status

    def write_shard(self, out_root: str, shard, clip_refs: list) -> dict:
        """Write one shard once its clips are done. The refs arrive nested (unresolved), so a
        clip whose call failed for good becomes a status row."""
        import ray

        from preprocessing.shard_format import ShardFolder, write_shard

        outcomes = []
        for item, ref in zip(shard.clips, clip_refs):
            try:
                outcomes.append(ray.get(ref))
            except Exception as exc:  # noqa: BLE001 - classified into a row
                outcomes.append(outcome_of_failure(item, exc))
        enospc = self.spec.faults.get("writer_enospc") or []
        if "*" in enospc or shard.name in enospc:
            raise OSError(errno.ENOSPC, "No space left on device (injected)", str(Path(out_root) / "shards"))
        return write_shard(ShardFolder(out_root), shard, outcomes)

    # -- one clip under the job's guards -------------------------------------------------
    def _attempt(self, item: ClipItem, work: Callable[[], ClipOutcome], lost: int = 0) -> ClipOutcome:
        """Run ``work`` (which never raises: failures are outcomes); retry it in place while
        the failure is transient; test-only faults."""
        import ray

        started_at = time.time()
        faults, seconds = self.spec.faults, {}
        if _fire(self.spec.fault_dir, "kill_worker", item.clip_id, faults, once=True) or \
                _fire(self.spec.fault_dir, "kill_worker_always", item.clip_id, faults, once=False):
            os.kill(os.getpid(), 9)                  # as if the node's OOM killer struck
        for attempt in range(1 + self.spec.clip_retries):
            if _fire(self.spec.fault_dir, "transient_error", item.clip_id, faults, once=True):
                outcome = _failed(item, "process", ConnectionResetError(errno.ECONNRESET,
                                                                        "injected transient error"))
            elif _fire(self.spec.fault_dir, "stage_error", item.clip_id, faults, once=False):
                outcome = _failed(item, "process", ValueError("injected deterministic error"))
            else:
                outcome = work()
            for stage, sec in outcome.seconds.items():
                seconds[stage] = seconds.get(stage, 0.0) + sec
            if not outcome.transient:
                break
        outcome.seconds = seconds
        outcome.attempts = lost + attempt + 1
        outcome.node = ray.util.get_node_ip_address()
        outcome.started_at, outcome.finished_at = started_at, time.time()
        return outcome


def on_local_disk(item: ClipItem, work: Callable[[ClipItem], ClipOutcome]) -> ClipOutcome:
    """Run ``work`` on the clip; a video at a URL (``s3://...``) is first copied to a temporary
    local file (the decoders read files), removed afterwards; the outcome keeps the URL."""
    import dataclasses
    import shutil
    import tempfile

    from preprocessing import storage

    if not storage.is_url(item.path):
        return work(item)
    with tempfile.TemporaryDirectory(prefix="expportrait-clip-") as tmp:
        local = os.path.join(tmp, storage.url_name(item.path))
        with storage.open_url(item.path) as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        outcome = work(dataclasses.replace(item, path=local))
    outcome.path = item.path
    return outcome


def _failed(item: ClipItem, stage: str, exc: BaseException) -> ClipOutcome:
    return ClipOutcome(item.clip_id, item.identity_id, item.split, item.path, status="stage_error",
                       stage=stage, reason=one_line(exc), error_type=type(exc).__name__,
                       transient=is_transient(exc))


def _fire(fault_dir: str, kind: str, clip_id: str, faults: dict, once: bool) -> bool:
    """Test hook: True when ``kind`` is set for ``clip_id`` (the first time only if ``once``)."""
    if clip_id not in (faults.get(kind) or []):
        return False
    if not once:
        return True
    flag = Path(fault_dir) / f"{kind}-{clip_id}"
    flag.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


# -- what a failed call means -------------------------------------------------------------

def outcome_of_failure(item: ClipItem, exc: BaseException) -> ClipOutcome:
    """The row of a clip whose call raised instead of returning an outcome: ``worker_lost``
    for a dead worker process or a lost object, ``stage_error`` (with the exception's type
    and message) for an error raised by the code."""
    kind, stage, error = classify_call_error(exc)
    return ClipOutcome(item.clip_id, item.identity_id, item.split, item.path, status=kind, stage=stage,
                       reason=one_line(error), error_type=type(error).__name__)
