"""The preprocessing driver's scheduler: a pool of worker actors fed in plan order, critical
path first. No file formats here and nothing of a clip's content: it moves object refs.

* :class:`WorkerPool` starts a worker actor per slot the cluster has (its size is read again
  every few seconds, so an autoscaled cluster gets more workers; the autoscaler is asked for
  more through ``request_resources``) and hands each ready actor one call at a time.
* :class:`Scheduler` keeps at most ``window`` shards *open* (admitted, not yet written), so
  finished samples waiting in the object store stay bounded; fits identities first (an
  identity's other clips wait on its anchor clip), also those of the next shards; gives a
  shard to a writer once all its outcomes are in; needs no call where the identity fit
  already gave a clip's outcome (the anchor, failed anchor candidates) or where it failed.
"""
from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from preprocessing.clip_records import ClipItem, ClipOutcome, IdentityFit, identity_failure_outcome
from preprocessing.shard_format import ShardSpec

from ..job_io import OutputDir
from .config import WorkerConfig
from .workers import classify_call_error, outcome_of_failure

#: work kinds, most urgent first: a write frees the object store, an identity unblocks clips
PRIORITY = {"write": 0, "identity": 1, "clip": 2}


class WorkerSetupError(RuntimeError):
    """A worker actor could not be built (its constructor raised): no clip can run."""


@dataclass(order=True)
class Work:
    priority: int
    seq: int
    kind: str = field(compare=False)
    args: tuple = field(compare=False)
    lost: int = field(default=0, compare=False)    # earlier runs whose worker process died


@dataclass
class Call:
    """A call running on an actor; ``refs`` are its returns (the first one is watched)."""

    kind: str
    actor: Any
    key: str                              # identity id, or the shard's name
    refs: tuple
    work: Work
    clip_id: str = ""

    @property
    def small_ref(self):
        """The return that says how the call ended and is cheap to fetch (a clip call's
        outcome carries its samples: its second return is the status alone)."""
        return self.refs[1] if self.kind == "clip" else self.refs[0]


@dataclass
class IdentityState:
    fit: IdentityFit | None = None        # None when its call failed (see ``error``)
    fit_ref: Any = None                   # what clip calls receive
    tried: dict[str, ClipOutcome] = field(default_factory=dict)   # failed anchor candidates
    anchor_ref: Any = None                # the anchor clip's outcome (its samples)
    error: BaseException | None = None


@dataclass
class OpenShard:
    spec: ShardSpec
    outcomes: dict[str, Any] = field(default_factory=dict)    # clip id -> outcome ref
    running: set[str] = field(default_factory=set)            # clip ids whose call runs
    writing: bool = False

    @property
    def complete(self) -> bool:
        return len(self.outcomes) == len(self.spec.clips) and not self.running


class WorkerPool:
    """Worker actors: as many as the cluster holds (one per slot of the configured CPUs/GPUs),
    handed out one call at a time. Actors hold their slot for the job, so no actor is asked for
    that cannot be placed now: a pending one could take the slot of a worker that Ray is
    restarting and leave its call waiting. Growth comes from the autoscaler, asked through
    ``request_resources`` (``autoscale_extra_workers``), and is picked up on the next resize."""

    def __init__(self, ray, actor_class, spec, workers: WorkerConfig, autoscale: bool = False,
                 resize_every: float = 5.0) -> None:
        self.ray, self.actor_class, self.spec, self.cfg = ray, actor_class, spec, workers
        self.autoscale, self.resize_every = autoscale and workers.autoscale_extra_workers > 0, resize_every
        self.actors: list = []
        self.starting: dict = {}          # ready() ref -> actor
        self.idle: deque = deque()
        self.slots = 0
        self._sized_at = -1e9
        self._requested = 0
        self.start_failures = 0

    def bundle(self) -> dict:
        return {"CPU": self.cfg.num_cpus, **({"GPU": self.cfg.num_gpus} if self.cfg.num_gpus else {})}

    def resize(self, remaining: int | None = None) -> None:
        """Read the cluster's size (every ``resize_every`` s) and start actors up to the slots it
        has (never fewer than one; actors are not taken away). With autoscaling on, ask for
        ``autoscale_extra_workers`` more slots, but not more than ``remaining`` calls can use."""
        if time.monotonic() - self._sized_at < self.resize_every:
            return
        self._sized_at = time.monotonic()
        res, w = self.ray.cluster_resources(), self.cfg
        slots = res.get("CPU", 1) // max(w.num_cpus, 1e-3)
        if w.num_gpus:
            slots = min(slots, res.get("GPU", 0) // w.num_gpus)
        self.slots = max(1, int(slots), self.slots)
        while len(self.actors) < self.slots:
            actor = self.actor_class.remote(self.spec)
            self.actors.append(actor)
            self.starting[actor.ready.remote()] = actor
        if self.autoscale:
            want = self.slots + w.autoscale_extra_workers
            if remaining is not None:
                want = max(self.slots, min(want, remaining))
            if want != self._requested:
                self._request([self.bundle()] * want)

    def _request(self, bundles: list[dict]) -> None:
        from ray.autoscaler.sdk import request_resources
        request_resources(bundles=bundles)
        self._requested = len(bundles)

    def started(self, ref) -> None:
        """An actor's ``ready`` call returned: it takes work now (or it could not be built)."""
        actor = self.starting.pop(ref)
        try:
            self.ray.get(ref)
        except Exception as exc:  # noqa: BLE001
            status, _, cause = classify_call_error(exc)
            if status == "worker_lost":         # died while starting: ask for another one
                self.actors.remove(actor)
                self._sized_at = -1e9
                self.start_failures += 1
                if self.start_failures > max(3, self.cfg.max_retries * max(1, self.slots)):
                    raise WorkerSetupError(f"workers keep dying while they start ({self.start_failures} "
                                           f"times; last: {type(cause).__name__}: {cause})") from None
                return
            raise WorkerSetupError(f"a worker could not start: {type(cause).__name__}: {cause}") from None
        self.idle.append(actor)

    def restart(self, actor) -> None:
        """An actor whose process died: Ray restarts it; it takes work again once ready."""
        self.starting[actor.ready.remote()] = actor

    def take(self):
        return self.idle.popleft() if self.idle else None

    def give_back(self, actor) -> None:
        self.idle.append(actor)

    def shutdown(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        if self._requested:
            self._request([])            # the standing request ends with the job


class Scheduler:
    """See the module docstring. ``fill`` hands out work, ``step`` reacts to what finished."""

    def __init__(self, ray, pool: WorkerPool, out: OutputDir, stage_fp: str, pending: list[ShardSpec],
                 by_identity: dict[str, list[ClipItem]], clips_per_shard: int,
                 max_pending_shards: int | None, bar, max_retries: int = 3) -> None:
        self.ray, self.pool, self.out, self.stage_fp, self.bar = ray, pool, out, stage_fp, bar
        self.by_identity, self.clips_per_shard = by_identity, clips_per_shard
        self.max_pending_shards, self.max_retries = max_pending_shards, max_retries
        self.queue: deque[ShardSpec] = deque(pending)
        self.pending_ids = {c.clip_id for s in pending for c in s.clips}
        self.queued_clips = len(self.pending_ids)      # clips of shards not opened yet
        self.node = ray.util.get_node_ip_address()
        self.work: list[Work] = []
        self._seq = itertools.count()
        self.calls: dict = {}                          # watched ref -> Call
        self.identities: dict[str, IdentityState] = {}
        self.started: set[str] = set()                 # identities queued, running or known
        self.waiting: dict[str, list[tuple[str, ClipItem]]] = {}   # identity -> open shards' clips
        self.shards: dict[str, OpenShard] = {}
        self.written = self.fitted = 0
        self.fault: BaseException | None = None       # a writer's failure: the job stops

    @property
    def busy(self) -> bool:
        return self.fault is None and bool(self.queue or self.shards)

    @property
    def window(self) -> int:
        return self.max_pending_shards or 2 + -(-self.pool.slots // self.clips_per_shard)

    # -- planning ------------------------------------------------------------------------
    def fill(self) -> None:
        """Open shards up to the window, start identity fits for those and the next window's
        shards, and hand work to idle actors."""
        self.pool.resize(remaining=self.queued_clips + len(self.work))
        while self.queue and len(self.shards) < self.window:
            shard = self.queue.popleft()
            self.queued_clips -= len(shard.clips)
            self._open(shard)
        for shard in itertools.islice(self.queue, self.window):     # look ahead: fit identities early
            for clip in shard.clips:
                self._start_identity(clip.identity_id)
        while self.work and self.pool.idle:
            self._submit(heapq.heappop(self.work), self.pool.take())

    def _push(self, kind: str, *args) -> None:
        heapq.heappush(self.work, Work(PRIORITY[kind], next(self._seq), kind, args))

    def _submit(self, work: Work, actor) -> None:
        if work.kind == "identity":
            (iid,) = work.args
            refs = actor.fit_identity.options(num_returns=3).remote(iid, self.by_identity[iid], work.lost)
            self.calls[refs[0]] = Call("identity", actor, iid, tuple(refs), work)
        elif work.kind == "clip":
            name, clip = work.args
            ref, done = actor.process_clip.options(num_returns=2).remote(
                clip, self.identities[clip.identity_id].fit_ref, work.lost)
            self.calls[ref] = Call("clip", actor, name, (ref, done), work, clip.clip_id)
            self.shards[name].outcomes[clip.clip_id] = ref
            self.shards[name].running.add(clip.clip_id)
        else:
            (name,) = work.args
            shard = self.shards[name]
            ref = actor.write_shard.remote(str(self.out.root), shard.spec,
                                           [shard.outcomes[c.clip_id] for c in shard.spec.clips])
            self.calls[ref] = Call("write", actor, name, (ref,), work)

    def _open(self, spec: ShardSpec) -> None:
        self.shards[spec.name] = OpenShard(spec)
        for clip in spec.clips:
            self._start_identity(clip.identity_id)
            if clip.identity_id in self.identities:
                self._assign(spec.name, clip)
            else:
                self.waiting.setdefault(clip.identity_id, []).append((spec.name, clip))

    def _start_identity(self, iid: str) -> None:
        if iid in self.started:
            return
        self.started.add(iid)
        # A saved identity is reused unless its anchor clip is pending: the anchor's outcome
        # comes from the identity fit itself, so a rerun reproduces it exactly.
        saved = self.out.load_identity(iid, self.stage_fp)
        if saved is not None and saved.anchor_clip_id not in self.pending_ids:
            self.identities[iid] = IdentityState(saved, self.ray.put(saved))
        else:
            self._push("identity", iid)

    def _assign(self, name: str, clip: ClipItem) -> None:
        """The outcome of an open shard's clip whose identity is known: a call, or at once."""
        state = self.identities[clip.identity_id]
        if state.error is not None:
            ref = self._row(outcome_of_failure(clip, state.error))
        elif clip.clip_id == state.fit.anchor_clip_id and state.anchor_ref is not None:
            ref = state.anchor_ref
        elif clip.clip_id in state.tried:
            ref = self.ray.put(state.tried[clip.clip_id])
        elif state.fit.status != "ok":
            ref = self._row(identity_failure_outcome(clip, state.fit))
        else:
            self._push("clip", name, clip)
            return
        self.shards[name].outcomes[clip.clip_id] = ref
        self.bar.update(1)
        self._maybe_write(name)

    def _row(self, outcome: ClipOutcome):
        outcome.node = self.node
        outcome.started_at = outcome.finished_at = time.time()
        return self.ray.put(outcome)

    def _maybe_write(self, name: str) -> None:
        shard = self.shards[name]
        if shard.complete and not shard.writing:
            shard.writing = True
            self._push("write", name)

    # -- reacting ------------------------------------------------------------------------
    def step(self, timeout: float = 1.0) -> None:
        """Wait (up to ``timeout``) for anything to finish, then react to all that has."""
        watch = list(self.calls) + list(self.pool.starting)
        if not watch:
            return
        first, _ = self.ray.wait(watch, num_returns=1, timeout=timeout, fetch_local=False)
        if not first:
            return
        ready, _ = self.ray.wait(watch, num_returns=len(watch), timeout=0, fetch_local=False)
        for ref in ready:
            if ref in self.pool.starting:
                self.pool.started(ref)
                continue
            call = self.calls.pop(ref)
            died = self._worker_died(call)
            if died is not None:
                self.pool.restart(call.actor)       # Ray restarts it; it rejoins when ready
                if self._retry(call, died):
                    continue
            else:
                self.pool.give_back(call.actor)
            if call.kind == "identity":
                self._identity_done(call.key, call.refs)
            elif call.kind == "clip":
                shard = self.shards[call.key]
                shard.running.discard(call.clip_id)
                self.bar.update(1)
                self._maybe_write(call.key)
            else:
                self._written(call.key, ref)

    def _worker_died(self, call: Call) -> BaseException | None:
        """The error of a call whose worker process died (else None). Only the call's small
        return is fetched (a clip's samples are left to the writer)."""
        try:
            self.ray.get(call.small_ref)
            return None
        except Exception as exc:  # noqa: BLE001
            return exc if classify_call_error(exc)[0] == "worker_lost" else None

    def _retry(self, call: Call, exc: BaseException) -> bool:
        """Queue the work of a call whose worker died again if it has retries left (True);
        else a clip gets its ``worker_lost`` row here, with the runs it had."""
        if call.work.lost < self.max_retries:
            call.work.lost += 1
            heapq.heappush(self.work, call.work)
            if call.kind == "clip":
                shard = self.shards[call.key]
                shard.running.discard(call.clip_id)
                del shard.outcomes[call.clip_id]
            return True
        if call.kind == "clip":
            clip = call.work.args[1]
            row = outcome_of_failure(clip, exc)
            row.attempts = call.work.lost + 1
            self.shards[call.key].outcomes[clip.clip_id] = self._row(row)
        return False

    def _identity_done(self, iid: str, refs: tuple) -> None:
        fit_ref, tried_ref, anchor_ref = refs
        try:
            fit, tried = self.ray.get([fit_ref, tried_ref])
            state = IdentityState(fit, fit_ref, tried, anchor_ref)
        except Exception as exc:  # noqa: BLE001 - its worker died on every retry, or the code raised
            state = IdentityState(error=exc)
        if state.fit is not None and state.fit.status == "ok":
            self.out.save_identity(state.fit, self.stage_fp)
            self.fitted += 1
        self.identities[iid] = state
        for name, clip in self.waiting.pop(iid, []):
            self._assign(name, clip)

    def _written(self, name: str, ref) -> None:
        try:
            self.ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - the job stops; the driver says why
            _, _, cause = classify_call_error(exc)
            self.fault = cause
            return
        del self.shards[name]
        self.written += 1
