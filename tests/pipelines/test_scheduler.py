"""The preprocessing driver's scheduler against a fake, in-process Ray: what it submits, in
which order, and how much it keeps in flight (the real Ray runs in test_preprocess_job.py)."""
from types import SimpleNamespace

import numpy as np
import pytest

from pipelines.job_io import plan_shards
from pipelines.preprocess import WorkerConfig, _Scheduler
from preprocessing.clip_records import ClipItem, ClipOutcome, IdentityFit


class Ref:
    def __init__(self, value=None, error: Exception | None = None, ready: bool = True) -> None:
        self.value, self.error, self.ready = value, error, ready


class FakeRay:
    """Tasks finish one per ``wait``, oldest first; ``cpus`` decides the cluster's size."""

    def __init__(self, cpus: int, lost_identities: tuple[str, ...] = (), grow_to: int | None = None) -> None:
        self.cpus, self.lost, self.grow_to = cpus, set(lost_identities), grow_to
        self.running: list[tuple[Ref, ...]] = []
        self.log: list[tuple[str, str]] = []           # (kind, id) in submission order
        self.max_running = 0
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

    def wait(self, refs, num_returns=1, timeout=None, fetch_local=True):
        if len({id(r) for r in refs}) != len(refs):
            raise ValueError("ray.wait got a duplicate ref")
        if self.running and not any(r.ready for r in refs):
            for ref in self.running.pop(0):
                ref.ready = True
            if self.grow_to and self.cpus != self.grow_to:   # nodes join after a task finished
                self.max_before_growth, self.cpus = self.max_running, self.grow_to
        ready = [r for r in refs if r.ready][:num_returns]
        return ready, [r for r in refs if r not in ready]

    def submit(self, kind: str, key: str, *values, error: Exception | None = None) -> tuple[Ref, ...]:
        refs = tuple(Ref(v, error, ready=False) for v in values)
        self.running.append(refs)
        self.log.append((kind, key))
        self.max_running = max(self.max_running, len(self.running))
        return refs


def _outcome(clip: ClipItem) -> ClipOutcome:
    return ClipOutcome(clip.clip_id, clip.identity_id, clip.split, clip.path, status="ok",
                       samples=[{"__key__": clip.clip_id}])


def _tasks(ray: FakeRay, written: list) -> dict:
    def identity(iid, items, spec):
        anchor = items[0]
        fit = IdentityFit(iid, "ok", anchor_clip_id=anchor.clip_id, betas=np.zeros(3, np.float32),
                          static_offsets=np.zeros((4, 3), np.float32))
        error = RuntimeError("worker died 4 times") if iid in ray.lost else None
        return ray.submit("identity", iid, fit, {}, _outcome(anchor), error=error)

    def clip(item, fit_ref, spec):
        assert fit_ref.ready and fit_ref.value.status == "ok"      # only known identities
        return ray.submit("clip", item.clip_id, _outcome(item))[0]

    def write(root, shard, refs):
        assert all(r.ready for r in refs)                           # writers never wait
        outcomes = []
        for c, r in zip(shard.clips, refs):
            try:
                outcomes.append(ray.get(r))
            except RuntimeError:
                outcomes.append(ClipOutcome(c.clip_id, c.identity_id, c.split, c.path, status="worker_lost"))
        written.append((shard.name, [(o.clip_id, o.status) for o in outcomes]))
        return Ref({"name": shard.name})                            # written at once

    return {k: SimpleNamespace(remote=f) for k, f in
            (("identity", identity), ("clip", clip), ("write", write))}


def _run(ray: FakeRay, identities: int, clips: int, clips_per_shard: int, **workers):
    items = [ClipItem(f"id{i}_c{k}", f"/v/{i}_{k}.mp4", f"id{i}") for i in range(identities) for k in range(clips)]
    plan = plan_shards(items, clips_per_shard, "fp")
    by_identity: dict = {}
    for item in items:
        by_identity.setdefault(item.identity_id, []).append(item)
    out = SimpleNamespace(root="/out", load_identity=lambda iid, fp: None, save_identity=lambda fit, fp: None)
    written: list = []
    sched = _Scheduler(_tasks(ray, written), None, out, "fp", plan, by_identity,
                       WorkerConfig(**workers), clips_per_shard, SimpleNamespace(update=lambda n: None), ray=ray)
    open_max = 0
    while sched.busy:
        sched.fill()
        open_max = max(open_max, len(sched.shards))
        sched.step()
    return sched, plan, written, open_max


def test_identities_first_bounded_in_flight_and_every_shard_written_once():
    ray = FakeRay(cpus=2)
    sched, plan, written, open_max = _run(ray, identities=5, clips=3, clips_per_shard=2)
    assert sorted(name for name, _ in written) == sorted(s.name for s in plan)      # each once
    assert all(status == "ok" for _, rows in written for _, status in rows)
    assert {c for _, rows in written for c, _ in rows} == {c.clip_id for s in plan for c in s.clips}
    # anchors come from the identity tasks: one task per identity, one per other clip
    kinds = [k for k, _ in ray.log]
    assert kinds.count("identity") == 5 and kinds.count("clip") == 10
    # the first identity fits go out before any clip task (the clips wait on them)
    assert kinds[:2] == ["identity", "identity"]
    assert ray.max_running <= sched.slots + 1 == 3
    assert open_max <= sched.window == 3


def test_a_lost_identity_turns_its_clips_into_rows():
    ray = FakeRay(cpus=2, lost_identities=("id1",))
    _, _, written, _ = _run(ray, identities=3, clips=2, clips_per_shard=3)
    rows = dict(r for _, rows in written for r in rows)
    assert rows["id1_c0"] == rows["id1_c1"] == "worker_lost"
    assert all(s == "ok" for c, s in rows.items() if not c.startswith("id1"))
    assert ("clip", "id1_c1") not in ray.log


@pytest.mark.parametrize("depth", [1, 4])
def test_queue_depth_bounds_what_waits_in_ray(depth):
    ray = FakeRay(cpus=1)
    _, plan, written, _ = _run(ray, identities=2, clips=4, clips_per_shard=2, queue_depth=depth)
    assert ray.max_running == 1 + depth and len(written) == len(plan)


def test_a_growing_cluster_gets_more_work(monkeypatch):
    import pipelines.preprocess as job

    clock = iter(range(0, 10_000, 10))                      # 10 s per look at the clock
    monkeypatch.setattr(job.time, "monotonic", lambda: next(clock))
    ray = FakeRay(cpus=2, grow_to=6)
    sched, plan, written, _ = _run(ray, identities=4, clips=4, clips_per_shard=2)
    assert ray.max_before_growth == 3 and ray.max_running == 7 and sched.slots == 6
    assert len(written) == len(plan)
