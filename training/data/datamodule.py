"""A LightningDataModule over the preprocessing job's shards, through the shared reader.

- Splits come from the shards' names (``<split>-<k>.tar``), which the job cuts by identity:
  training reads ``train_split``, validation ``val_split``.
- Training draws resampled shards (a seeded stream per epoch, rank and worker): every rank
  gets exactly ``samples_per_epoch / world_size`` samples, so DDP ranks never wait on each
  other. Validation reads its shards once each, split by rank.
- **Data position**: the training stream is a pure function of (seed, epoch, rank, worker),
  so the module's checkpoint state is (epoch, batches consumed). On resume the loader
  fast-forwards past the consumed batches (their samples are decoded and dropped), and the
  next batch is the one the interrupted run would have read. Consumed batches are counted in
  ``on_after_batch_transfer`` (batches a step actually took; the loop's prefetched batch is
  not counted).
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

from .shards import ShardDataset, collate, shard_urls
from .sidecars import resolve_sidecars

#: what a transfer-module step decodes (frames, normals and masks are skipped)
TRANSFER_FIELDS = ("smplx", "dynamic_offsets", "face_vertex_ids", "static_offsets")


class ResumableLoader(DataLoader):
    """A DataLoader over a :class:`ShardDataset` that sets the dataset's epoch on each pass
    and skips the batches its owner says were consumed already."""

    def __init__(self, dataset: ShardDataset, owner: "ShardDataModule", **kwargs) -> None:
        super().__init__(dataset, **kwargs)
        self._owner = owner

    def __iter__(self) -> Iterator:
        epoch, skip = self._owner._begin_pass()
        self.dataset.set_epoch(epoch)
        it = super().__iter__()
        for _ in range(skip):
            next(it)
        yield from it


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
    def _begin_pass(self) -> tuple[int, int]:
        """(epoch, batches to skip) for a new pass over the training loader."""
        epoch = self.trainer.current_epoch if self.trainer is not None else self._epoch
        skip = 0
        if self._restored is not None and self._restored["epoch"] == epoch:
            skip = int(self._restored["consumed"])
        if epoch != self._epoch or skip:
            self._epoch, self._consumed = epoch, skip
        elif self._restored is None:
            self._consumed = 0
        return epoch, skip

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer is not None and self.trainer.training:
            self._consumed += 1
            self._restored = None          # the restored position has been used
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "consumed": self._consumed}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = dict(state_dict)
        self._epoch, self._consumed = int(state_dict["epoch"]), int(state_dict["consumed"])

