"""The actor-pool runtime of the Ray jobs: a pool of actors that each load their model once, fed
items one call at a time, results collected in item order with progress; a call that fails is
one item's failure, never the job's, and an actor whose process died is replaced.

The jobs only compose it: which actor class (and its constructor arguments), which method runs
an item, what a failed item's row is. ``encode_latents`` and batch ``reenact`` run on it; the
preprocessing job's :mod:`pipelines.preprocess.scheduler` keeps its own pool (identity anchoring,
a shard window and autoscaling) but shares :func:`classify_call_error`.

    pool = ActorPool(LatentEncoder, (codec, subfolder, threads), ActorResources(num_cpus=1))
    ready = pool.start(workers=2)              # each actor's ``ready()``; a constructor error raises here
    rows = pool.map("encode_shard", items, lambda item: (item, out, batch), on_failure=failed_row)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

#: a failed call's status: the code raised (``stage_error``) or the actor's process died (``worker_lost``)
STAGE_ERROR, WORKER_LOST = "stage_error", "worker_lost"


@dataclass(frozen=True)
class ActorResources:
    """What one actor holds and how Ray restarts it."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_restarts: int = 1
    max_task_retries: int = 0


@dataclass
class CallFailure:
    """An item whose call raised: ``status`` (:data:`STAGE_ERROR` or :data:`WORKER_LOST`),
    ``stage`` (``worker`` or ``setup``) and ``cause`` (the code's own exception where it raised)."""

    item: Any
    status: str
    stage: str
    cause: BaseException


def classify_call_error(exc: BaseException) -> tuple[str, str, BaseException]:
    """``(status, stage, cause)`` of an exception from ``ray.get`` on an actor call."""
    from ray import exceptions as rex

    if isinstance(exc, rex.RayTaskError):          # the code raised: its own exception
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        return STAGE_ERROR, "worker", cause
    if isinstance(exc, rex.RayActorError) and exc.actor_init_failed:   # the actor cannot be built
        return STAGE_ERROR, "setup", exc
    if isinstance(exc, (rex.RayActorError, rex.WorkerCrashedError, rex.ObjectLostError,
                        rex.OwnerDiedError, rex.NodeDiedError, rex.ObjectFetchTimedOutError,
                        rex.LocalRayletDiedError, rex.TaskCancelledError)):
        return WORKER_LOST, "worker", exc
    return STAGE_ERROR, "worker", exc


class ActorPool:
    """Actors of ``actor_cls(*actor_args)`` (Ray must be initialised): :meth:`start`, then
    :meth:`map`. The actor class needs a ``ready()`` method (what it returns is handed back by
    :meth:`start`, e.g. the id of the model it loaded)."""

    def __init__(self, actor_cls: type, actor_args: tuple = (), resources: ActorResources = ActorResources()) -> None:
        import ray

        self._remote = ray.remote(actor_cls).options(
            num_cpus=resources.num_cpus, num_gpus=resources.num_gpus,
            max_restarts=resources.max_restarts, max_task_retries=resources.max_task_retries)
        self._args = actor_args
        self.actors: list = []
        self.replaced = 0

    def _new_actor(self):
        return self._remote.remote(*self._args)

    def start(self, workers: int) -> list:
        """Start ``workers`` actors and wait until each is built; returns their ``ready()``
        values. An actor whose constructor raises raises here, before any item runs."""
        import ray

        self.actors = [self._new_actor() for _ in range(max(1, workers))]
        return ray.get([a.ready.remote() for a in self.actors])

    def map(self, method: str, items: Sequence, call_args: Callable[[Any], tuple],
            on_failure: Callable[[CallFailure], Any], progress: Callable[[Any], None] | None = None) -> list:
        """Run ``actor.method(*call_args(item))`` for every item, one call per idle actor;
        results in item order. A raising call's result is ``on_failure(CallFailure)`` (which
        may raise to stop the job); an actor whose process died is replaced by a new one.
        ``progress(result)`` is called as each item finishes."""
        import ray

        results: list = [None] * len(items)
        queue, running, idle = list(range(len(items))), {}, list(self.actors)
        while queue or running:
            while queue and idle:
                actor, i = idle.pop(), queue.pop(0)
                running[getattr(actor, method).remote(*call_args(items[i]))] = (actor, i)
            done, _ = ray.wait(list(running), num_returns=1)
            actor, i = running.pop(done[0])
            try:
                results[i] = ray.get(done[0])
            except Exception as exc:  # noqa: BLE001 - one item's failure, not the job's
                status, stage, cause = classify_call_error(exc)
                if status == WORKER_LOST:
                    actor = self._replace(actor)
                results[i] = on_failure(CallFailure(items[i], status, stage, cause))
            idle.append(actor)
            if progress is not None:
                progress(results[i])
        return results

    def shutdown(self) -> None:
        """Kill the pool's actors (their resources return to the cluster)."""
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []

    def _replace(self, dead):
        """A fresh actor in place of one whose process died (Ray's own restarts may be spent)."""
        import ray

        fresh = self._new_actor()
        self.actors[self.actors.index(dead)] = fresh
        self.replaced += 1
        try:
            ray.kill(dead, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        return fresh
