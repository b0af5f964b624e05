"""A LightningDataModule over the preprocessing job's shards, through the shared reader.

- Splits come from the shards' names (``<split>-<k>.tar``), which the job cuts by identity:
  training reads ``train_split``, validation ``val_split``.
- Training draws resampled shards (a seeded stream per epoch, rank and worker): every rank
  gets exactly ``samples_per_epoch / world_size`` samples, so DDP ranks never wait on each
  other. Validation reads its shards once each, split by rank.
- **Data position**: the training stream is a pure function of (seed, epoch, rank, worker)
  and addressable by position (``ShardDataset``: blocks of seeded shard draws), so the module's
  checkpoint state is (epoch, batches consumed) plus each rank's worker positions after their
  last consumed batch (gathered from every rank when a checkpoint is saved). On resume each
  worker starts at its position: nothing consumed is read or decoded again, the resume costs
  the same after 10 steps as after 10 000, and the next batch is the one the interrupted run
  would have read. Consumed batches are counted in ``on_after_batch_transfer`` (batches a step
  actually took; the loop's prefetched batch is not counted). Resumed on another world size
  (a universal checkpoint, ``training.checkpoints``): see :func:`resume_point`.
- Corrupt shards and members are skipped by the reader and counted: each batch carries
  ``reader_skipped`` (the count so far in its worker); the task logs it.
- Samples shorter than the task's training window (its ``window_span``, when it has one) are
  dropped by the reader and counted with the skips (``ShortSample``), instead of failing a step.
- What is decoded is what the task reads: ``fields`` (the members of the shards), the first
  ``window_span`` frames only when the task's windows start at frame 0 (its ``frames_read``;
  validation windows always do), and the sidecars given (``latents``, ``normals``). Samples
  are shuffled as bytes and decoded after the shuffle buffer (``ShardDataset``).
"""
from __future__ import annotations

import os
from typing import Iterator

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from .shards import ResumePoint, ShardDataset, collate, shard_urls
from .sidecars import resolve_sidecars

#: what a transfer-module step decodes (frames, normals and masks are skipped)
TRANSFER_FIELDS = ("smplx", "dynamic_offsets", "face_vertex_ids", "static_offsets")


class ResumableLoader(DataLoader):
    """A DataLoader over a :class:`ShardDataset` that sets the dataset's epoch on each pass
    and, for a resumed pass, where each of its workers starts (no batch is read to skip it)."""

    def __init__(self, dataset: ShardDataset, owner: "ShardDataModule", **kwargs) -> None:
        super().__init__(dataset, **kwargs)
        self._owner = owner

    def __iter__(self) -> Iterator:
        epoch, start = self._owner._begin_pass(self.dataset, self.num_workers, self.batch_size)
        self.dataset.set_epoch(epoch)
        self.dataset.start = start
        it = super().__iter__()          # the workers (or the in-process reader) take the start now
        self.dataset.start = None
        yield from it


def round_robin(batches: list[int], consumed: int) -> tuple[list[int], int]:
    """Batches each loader worker gave in the first ``consumed`` batches of a pass, and the
    worker due next: the DataLoader takes one batch from each worker in turn, passing over
    workers that are done (``batches``: what each gives in a pass)."""
    taken, worker = [0] * len(batches), 0
    for _ in range(min(consumed, sum(batches))):
        while taken[worker] >= batches[worker]:
            worker = (worker + 1) % len(batches)
        taken[worker] += 1
        worker = (worker + 1) % len(batches)
    return taken, worker


def resume_point(state: dict, dataset: ShardDataset, rank: int, world: int, workers: int,
                 batch_size: int) -> tuple[ResumePoint, int]:
    """Where this rank's loader workers start a resumed pass, and the batches it counts as
    consumed, from the data module's checkpoint state.

    Same world, workers and batch size: each worker continues at the position its last consumed
    sample recorded (exact: the next batch is the one the interrupted run would have read).
    Another world size (a universal checkpoint resumed on more or fewer processes): the samples
    consumed globally (``consumed x batch_size x world_size`` of the saving run) become this
    world's batches per rank; a (rank, worker) stream that existed continues where it stopped,
    a new one starts at its beginning (every stream is an independent seeded draw, so the
    sample distribution is unchanged); the epoch keeps its length in samples. A state without
    positions (an older checkpoint) derives them from the consumed counts."""
    consumed = int(state["consumed"])
    saved = (int(state.get("world_size", world)), int(state.get("batch_size", batch_size)),
             int(state.get("num_workers", max(workers, 1))))
    if saved != (world, batch_size, max(workers, 1)):
        consumed = consumed * saved[0] * saved[1] // (world * batch_size)
    count = max(workers, 1)
    quotas = [dataset.quota(w, count) for w in range(count)]
    taken, due = round_robin([q // batch_size for q in quotas], consumed)
    ranks = state.get("ranks")
    mine = (ranks or {}).get(rank, {})
    positions = None if ranks is None else {int(w): tuple(p) for w, p in mine.get("positions", {}).items()}
    point = ResumePoint(rotation=due, positions=positions,
                        consumed={w: t * batch_size for w, t in enumerate(taken)},
                        remaining={w: q - t * batch_size for w, (q, t) in enumerate(zip(quotas, taken))},
                        skipped={int(w): int(n) for w, n in mine.get("skipped", {}).items()})
    return point, sum(taken)


def check_root(root: str | os.PathLike | list[str], split: str = "train") -> None:
    """A shard root given as a folder exists and holds finished ``<split>-*.tar`` shards; else a
    user's mistake naming the folder (checked before any model is built)."""
    import glob

    from preprocessing import storage
    from preprocessing.errors import UserError
    if isinstance(root, (list, tuple)) or glob.has_magic(str(root)):
        return
    if not storage.is_dir(root):
        raise UserError(f"data root {root} does not exist (a preprocessing output or shards folder)",
                        root=str(root))
    if not shard_urls(root, split):
        raise UserError(f"data root {root} holds no finished {split}-*.tar shard (with its done marker)",
                        root=str(root))


class ShardDataModule(pl.LightningDataModule):
    """Shards of ``root`` (a preprocessing output folder, a shards folder or a glob)."""

    def __init__(self, root: str, train_split: str = "train", val_split: str | None = "val",
                 batch_size: int = 4, samples_per_epoch: int = 64, val_samples: int = 16,
                 num_workers: int = 0, shuffle_buffer: int = 16, seed: int = 0,
                 fields: list[str] | None = None, latents: str | None = None, cache_mb: float = 0,
                 normals: str | None = None) -> None:
        """``latents``: a latent sidecar folder (``LATENTS_DIR/<codec_id>/shards``, written by
        ``pipelines.encode_latents``); samples of shards with a matching sidecar carry
        ``latents`` and ``reference_latent``. ``normals``: a driving-normal sidecar folder
        (``NORMALS_DIR/<render_id>/shards``, ``pipelines.render_normals``); samples carry
        ``driving_normals`` and the generator task renders nothing. ``cache_mb``: keep up to that many MiB of decoded
        samples in memory per loader process (0: off; for corpora that fit, see ``shards``).
        ``latents`` / ``normals`` may also name the precompute job's ``--output`` (its
        ``<id>/shards`` is found); a run that could not train from what it reads is refused
        before any model is built (``training.data.sidecars``)."""
        super().__init__()
        check_root(root, train_split)
        self.save_hyperparameters()
        self.root = root
        self.fields = tuple(fields) if fields is not None else TRANSFER_FIELDS
        #: kind -> the sidecar shards folder read (None: none given)
        self.sidecars = resolve_sidecars(root, self.fields, {"latents": latents, "normals": normals},
                                         (train_split, val_split))
        self._epoch = 0
        self._consumed = 0             # training batches taken by steps in the current epoch
        self._positions: dict[int, tuple[int, int]] = {}     # loader worker -> position after its last batch
        self._skips: dict[int, int] = {}                      # loader worker -> its skips at that batch
        self._restored: dict | None = None

    # -- topology -----------------------------------------------------------------------
    def _world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    def window_span(self) -> int:
        """Frames the task's training window spans (0: the task reads whole samples)."""
        task = self.trainer.lightning_module if self.trainer is not None else None
        return int(getattr(task, "window_span", 0) or 0)

    def frames_read(self, training: bool) -> int | None:
        """Frames of a sample the task reads (None: all of them; the task's ``frames_read``
        for training, its window span for validation, whose windows start at frame 0)."""
        task = self.trainer.lightning_module if self.trainer is not None else None
        if task is None:
            return None
        if training:
            return getattr(task, "frames_read", None)
        return self.window_span() or None

    def split_fields(self, training: bool) -> tuple[str, ...]:
        """``fields``; with ``fields: []`` (a generator step on sidecar latents and normals reads
        no member of the shards) validation still decodes the frames: samples and PSNR need them."""
        return self.fields if training or self.fields else ("frames",)

    def _dataset(self, split: str, samples: int, training: bool) -> ShardDataset:
        urls = shard_urls(self.root, split)
        rank, world = self._world()
        per_rank = max(1, samples // world)
        return ShardDataset(urls, per_rank, resampled=training,
                            shuffle_buffer=self.hparams.shuffle_buffer if training else 0,
                            seed=self.hparams.seed, rank=rank, world_size=world, fields=self.split_fields(training),
                            latents=self.sidecars["latents"], cache_mb=self.hparams.cache_mb,
                            min_frames=self.window_span(), normals=self.sidecars["normals"],
                            max_frames=self.frames_read(training))

    def train_dataloader(self) -> DataLoader:
        ds = self._dataset(self.hparams.train_split, self.hparams.samples_per_epoch, True)
        return ResumableLoader(ds, self, batch_size=self.hparams.batch_size,
                               num_workers=self.hparams.num_workers, collate_fn=collate, drop_last=True)

    def val_dataloader(self) -> DataLoader | list:
        if not self.hparams.val_split or not shard_urls(self.root, self.hparams.val_split):
            return []
        ds = self._dataset(self.hparams.val_split, self.hparams.val_samples, False)
        return DataLoader(ds, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers,
                          collate_fn=collate)

    # -- data position ------------------------------------------------------------------
    def _begin_pass(self, dataset: ShardDataset, workers: int, batch_size: int) -> tuple[int, ResumePoint | None]:
        """(epoch, where the workers start: None for the beginning) for a new pass over the
        training loader."""
        epoch = self.trainer.current_epoch if self.trainer is not None else self._epoch
        restored = self._restored if self._restored is not None and self._restored["epoch"] == epoch else None
        self._epoch = epoch
        if restored is None:
            self._consumed, self._positions, self._skips = 0, {}, {}
            return epoch, None
        rank, world = self._world()
        point, self._consumed = resume_point(restored, dataset, rank, world, workers, batch_size)
        self._positions = dict(point.positions or {})
        self._skips = dict(point.skipped)
        return epoch, point

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer is not None and self.trainer.training:
            self.consumed(batch)
        return batch

    def consumed(self, batch: dict) -> None:
        """A training step took ``batch``: count it, and note its worker's position after it."""
        self._consumed += 1
        self._restored = None          # the restored position has been used
        if "reader_pos" in batch:
            worker = int(str(batch["reader_worker"][-1]).rsplit("-", 1)[1])
            self._positions[worker] = tuple(int(v) for v in batch["reader_pos"][-1])
            self._skips[worker] = int(batch["reader_skipped"][-1])

    def state_dict(self) -> dict:
        """(epoch, batches consumed) and each rank's worker positions (gathered from every rank:
        Lightning asks every rank for it when it saves), with the topology they belong to."""
        rank, world = self._world()
        mine = {"positions": {w: list(p) for w, p in self._positions.items()}, "skipped": dict(self._skips)}
        return {"epoch": self._epoch, "consumed": self._consumed, "world_size": world,
                "batch_size": self.hparams.batch_size, "num_workers": max(self.hparams.num_workers, 1),
                "ranks": _gather(mine, rank, world)}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = dict(state_dict)
        self._epoch, self._consumed = int(state_dict["epoch"]), int(state_dict["consumed"])


def _gather(mine: dict, rank: int, world: int) -> dict[int, dict]:
    """rank -> each rank's ``mine`` (every rank must call it together when the world is > 1)."""
    import torch.distributed as dist
    if world > 1 and dist.is_available() and dist.is_initialized():
        everyone: list = [None] * world
        dist.all_gather_object(everyone, mine)
        return dict(enumerate(everyone))
    return {rank: mine}
