"""The preprocessing driver's scheduler and worker pool against a fake, in-process Ray: what
they ask of the actors, in which order, how much runs at once, and what a dead worker or a
failed writer does (the real Ray runs in test_preprocess_job.py)."""
import errno
from types import SimpleNamespace

import numpy as np
import pytest
from ray import exceptions as rex

from preprocessing.shard_format import plan_shards
from pipelines.preprocess import WorkerConfig
from pipelines.preprocess import scheduler as sched_mod
from pipelines.preprocess.scheduler import Scheduler, WorkerPool, WorkerSetupError
from preprocessing.clip_records import ClipItem, ClipOutcome, IdentityFit


class Ref:
    def __init__(self, value=None, error: BaseException | None = None, ready: bool = True) -> None:
        self.value, self.error, self.ready = value, error, ready


class FakeRay:
    """Calls finish one per ``wait``, oldest first; ``cpus`` decides the cluster's size."""

    def __init__(self, cpus: int, grow_to: int | None = None) -> None:
        self.cpus, self.grow_to = cpus, grow_to
        self.running: list[tuple[Ref, ...]] = []
        self.log: list[tuple[str, str]] = []           # (method, key) in submission order
        self.killed = 0
        self.util = SimpleNamespace(get_node_ip_address=lambda: "127.0.0.1")

    def cluster_resources(self) -> dict:
        return {"CPU": float(self.cpus)}

    def put(self, value) -> Ref:
        return Ref(value)

    def get(self, refs):
        if isinstance(refs, list):
            return [self.get(r) for r in refs]
        if refs.error is not None:
            raise refs.error
        return refs.value

    def kill(self, actor) -> None:
        self.killed += 1

    def wait(self, refs, num_returns=1, timeout=None, fetch_local=True):
        if len({id(r) for r in refs}) != len(refs):
            raise ValueError("ray.wait got a duplicate ref")
        if self.running and not any(r.ready for r in refs):
            for ref in self.running.pop(0):
                ref.ready = True
            if self.grow_to:                                 # nodes join after a call finished
                self.cpus = self.grow_to
        ready = [r for r in refs if r.ready][:num_returns]
        return ready, [r for r in refs if r not in ready]

    def submit(self, method: str, key: str, *values, error: BaseException | None = None) -> tuple[Ref, ...]:
        refs = tuple(Ref(v, error, ready=False) for v in values)
        self.running.append(refs)
        self.log.append((method, key))
        return refs


class FakeActor:
    """Methods answer like ClipWorker's; ``behaviour`` says which keys die or fail."""

    def __init__(self, ray: FakeRay, behaviour: dict, written: list) -> None:
        self.ray, self.behaviour, self.written = ray, behaviour, written
        self.ready = SimpleNamespace(remote=self._ready)
        self.fit_identity = SimpleNamespace(options=lambda num_returns: SimpleNamespace(remote=self._identity))
        self.process_clip = SimpleNamespace(options=lambda num_returns: SimpleNamespace(remote=self._clip))
        self.write_shard = SimpleNamespace(remote=self._write)

    def _error(self, key: str, lost: int) -> BaseException | None:
        if key in self.behaviour.get("die_always", ()) or (key in self.behaviour.get("die_once", ()) and lost == 0):
            return rex.ActorDiedError()
        return None

    def _ready(self):
        error = self.behaviour.get("init_error")
        return self.ray.submit("ready", "", "127.0.0.1", error=error)[0]

    def _identity(self, iid, items, lost):
        anchor = items[0]
        fit = IdentityFit(iid, "ok", anchor_clip_id=anchor.clip_id, betas=np.zeros(3, np.float32),
                          static_offsets=np.zeros((4, 3), np.float32))
        return self.ray.submit("identity", iid, fit, {}, _outcome(anchor, lost), error=self._error(iid, lost))

    def _clip(self, item, fit_ref, lost):
        assert fit_ref.ready and fit_ref.value.status == "ok"      # only known identities
        outcome = _outcome(item, lost)
        return self.ray.submit("clip", item.clip_id, outcome, outcome.status,
                               error=self._error(item.clip_id, lost))

    def _write(self, root, shard, refs):
        assert all(r.ready for r in refs)                           # writers never wait
        if shard.name in self.behaviour.get("enospc", ()):
            return self.ray.submit("write", shard.name, None,
                                   error=OSError(errno.ENOSPC, "No space left on device"))[0]
        rows = []
        for c, r in zip(shard.clips, refs):
            o = self.ray.get(r) if r.error is None else None
            rows.append((c.clip_id, o.status if o else "error", o.attempts if o else 0))
        self.written.append((shard.name, rows))
        return self.ray.submit("write", shard.name, {"name": shard.name})[0]


def _outcome(clip: ClipItem, lost: int = 0) -> ClipOutcome:
    return ClipOutcome(clip.clip_id, clip.identity_id, clip.split, clip.path, status="ok",
                       samples=[{"__key__": clip.clip_id}], attempts=lost + 1)


def _run(ray: FakeRay, identities: int, clips: int, clips_per_shard: int, behaviour: dict | None = None,
         **workers):
    items = [ClipItem(f"id{i}_c{k}", f"/v/{i}_{k}.mp4", f"id{i}") for i in range(identities) for k in range(clips)]
    plan = plan_shards(items, clips_per_shard, "fp")
    by_identity: dict = {}
    for item in items:
        by_identity.setdefault(item.identity_id, []).append(item)
    out = SimpleNamespace(root="/out", load_identity=lambda iid, fp: None, save_identity=lambda fit, fp: None)
    written: list = []
    actor_class = SimpleNamespace(remote=lambda spec: FakeActor(ray, behaviour or {}, written))
    cfg = WorkerConfig(**workers)
    pool = WorkerPool(ray, actor_class, None, cfg)
    sched = Scheduler(ray, pool, out, "fp", plan, by_identity, clips_per_shard, cfg.max_pending_shards,
                      SimpleNamespace(update=lambda n: None), max_retries=cfg.max_retries)
    open_max = in_flight_max = 0
    while sched.busy:
        sched.fill()
        open_max = max(open_max, len(sched.shards))
        in_flight_max = max(in_flight_max, len(sched.calls))
        assert len({id(c.actor) for c in sched.calls.values()}) == len(sched.calls)   # one call per actor
        sched.step()
    return sched, plan, written, open_max, in_flight_max


def test_identities_first_bounded_in_flight_and_every_shard_written_once():
    ray = FakeRay(cpus=2)
    sched, plan, written, open_max, in_flight = _run(ray, identities=5, clips=3, clips_per_shard=2)
    assert sorted(name for name, _ in written) == sorted(s.name for s in plan)      # each once
    assert all(status == "ok" for _, rows in written for _, status, _ in rows)
    assert {c for _, rows in written for c, _, _ in rows} == {c.clip_id for s in plan for c in s.clips}
    # anchors come from the identity calls: one call per identity, one per other clip
    kinds = [k for k, _ in ray.log if k != "ready"]
    assert kinds.count("identity") == 5 and kinds.count("clip") == 10 and kinds.count("write") == len(plan)
    assert kinds[:2] == ["identity", "identity"]        # the clips wait on them
    assert len(sched.pool.actors) == sched.pool.slots == 2 and in_flight <= 2
    assert open_max <= sched.window == 3


def test_a_dead_worker_is_retried_and_then_lost():
    ray = FakeRay(cpus=2)
    behaviour = {"die_once": ("id0_c1", "id2"), "die_always": ("id1_c1",)}
    sched, _, written, _, _ = _run(ray, identities=3, clips=2, clips_per_shard=3, behaviour=behaviour,
                                   max_retries=2)
    rows = {c: (s, a) for _, rs in written for c, s, a in rs}
    assert rows["id0_c1"] == ("ok", 2)                        # died once, ran again
    assert rows["id2_c0"] == ("ok", 2) and rows["id2_c1"][0] == "ok"   # the identity call too
    assert rows["id1_c1"] == ("worker_lost", 3)               # 1 + max_retries runs
    assert ray.log.count(("clip", "id1_c1")) == 3
    assert ray.log.count(("ready", "")) == 2 + 1 + 1 + 3       # start + a restart per death


def test_writer_fault_stops_the_job():
    ray = FakeRay(cpus=2)
    sched, plan, written, _, _ = _run(ray, identities=4, clips=2, clips_per_shard=2,
                                      behaviour={"enospc": ("train-000001",)})
    assert isinstance(sched.fault, OSError) and sched.fault.errno == errno.ENOSPC
    assert not sched.busy and len(written) < len(plan)
    assert "train-000001" not in {n for n, _ in written}


def test_a_worker_that_cannot_start_is_a_setup_error():
    ray = FakeRay(cpus=1)
    with pytest.raises(WorkerSetupError, match="ValueError"):
        _run(ray, identities=1, clips=1, clips_per_shard=1,
             behaviour={"init_error": rex.RayTaskError("ready", "tb", ValueError("bad estimator"))})


def test_a_growing_cluster_gets_more_workers(monkeypatch):
    clock = iter(range(0, 10_000, 10))                      # 10 s per look at the clock
    monkeypatch.setattr(sched_mod.time, "monotonic", lambda: next(clock))
    ray = FakeRay(cpus=2, grow_to=6)
    sched, plan, written, _, in_flight = _run(ray, identities=6, clips=4, clips_per_shard=2)
    assert sched.pool.slots == 6 and len(sched.pool.actors) == 6 and in_flight == 6
    assert len(written) == len(plan)


def test_autoscaler_is_asked_for_what_the_work_can_use(monkeypatch):
    asked = []
    ray = FakeRay(cpus=2)
    pool = WorkerPool(ray, SimpleNamespace(remote=lambda spec: FakeActor(ray, {}, [])), None,
                      WorkerConfig(num_cpus=1, autoscale_extra_workers=4), autoscale=True)
    monkeypatch.setattr(pool, "_request", lambda bundles: (asked.append(len(bundles)),
                                                           setattr(pool, "_requested", len(bundles))))
    pool.resize(remaining=100)
    assert asked == [6] and pool.bundle() == {"CPU": 1.0}
    pool._sized_at = -1e9
    pool.resize(remaining=3)                               # the tail: only what the work can use
    assert asked == [6, 3]
    pool._sized_at = -1e9
    pool.resize(remaining=1)                               # never below the cluster's own slots
    assert asked == [6, 3, 2]
    pool.shutdown()                                        # the standing request ends with the job
    assert asked == [6, 3, 2, 0]


def test_workers_that_keep_dying_at_start_stop_the_job():
    ray = FakeRay(cpus=1)
    with pytest.raises(WorkerSetupError, match="keep dying"):
        _run(ray, identities=1, clips=1, clips_per_shard=1, behaviour={"init_error": rex.ActorDiedError()})
