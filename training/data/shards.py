"""Training reader of the preprocessing job's WebDataset shards.

Samples are decoded by :mod:`preprocessing.sample_schema`, the module the writer uses.

* ``resampled=True`` (training): every (rank, worker) draws shards with replacement from its
  own seeded stream, so no rank ever runs out;
* ``resampled=False`` (evaluation): shards are split by rank, then by worker, and cycled;
* either way each rank yields exactly ``samples_per_rank`` samples per epoch (spread over its
  DataLoader workers), so uneven shards cannot leave one DDP rank waiting for another;
* ``fields`` picks what is decoded (default all; a generator step needs ``("frames",
  "normals")``, which decodes in half the time), see ``sample_schema.FIELDS``;
* a corrupt shard or member (bad tar, truncated file, undecodable member) is skipped and
  counted (:class:`SkipCounter`); a run of ``max_empty_shards`` shards in a row without one
  good sample is an error rather than a silent spin.
"""
from __future__ import annotations

import glob
import itertools
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipelines.job_io import MARKER_SUFFIX
from preprocessing.sample_schema import ShardSample, decode_sample


def shard_urls(source: str | os.PathLike | list[str], split: str | None = None) -> list[str]:
    """Finished shards of an output folder (those with a done marker), a glob, or a list."""
    if isinstance(source, (list, tuple)):
        return list(source)
    path = Path(source)
    if path.is_dir():
        shards = path / "shards" if (path / "shards").is_dir() else path
        pattern = f"{split}-*.tar" if split else "*.tar"
        return [str(p) for p in sorted(shards.glob(pattern))
                if p.with_name(p.stem + MARKER_SUFFIX).is_file()]
    return sorted(glob.glob(str(source)))


@dataclass
class SkipCounter:
    """Counts what was skipped, by exception type; use as a webdataset ``handler``."""

    counts: Counter = field(default_factory=Counter)
    last: str = ""

    def __call__(self, exc: BaseException) -> bool:
        self.counts[type(exc).__name__] += 1
        self.last = str(exc)[:300]
        return True                                   # keep going

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


#: sample field -> the dtype its tensor gets (None: as stored; frames and normals stay uint8
#: until the GPU)
TENSOR_FIELDS = {"frames": None, "normals": None, "silhouette": None, "face_mask": None,
                 "depth": np.float32, "dynamic_offsets": np.float32, "static_offsets": np.float32,
                 "face_vertex_ids": np.int64}


def to_torch(sample: ShardSample, skipped: int = 0) -> dict:
    """Schema sample -> tensors a training step takes. Fields the reader did not decode are
    left out."""
    out = {"key": sample.key}
    for name, dtype in TENSOR_FIELDS.items():
        value = getattr(sample, name)
        if value is not None:
            out[name] = torch.from_numpy(value if dtype is None else value.astype(dtype))
    if sample.smplx is not None:
        out["smplx"] = {k: torch.from_numpy(v) for k, v in sample.smplx.items()}
    out["identity_id"] = sample.meta.get("identity_id", "")
    out["reader_skipped"] = skipped
    return out


class ShardDataset(IterableDataset):
    """A fixed-length epoch of decoded samples for this rank (see the module docstring)."""

    def __init__(self, urls: list[str], samples_per_rank: int, resampled: bool = True,
                 shuffle_buffer: int = 0, seed: int = 0, convert: Callable | None = to_torch,
                 max_empty_shards: int = 50, rank: int | None = None, world_size: int | None = None,
                 fields: Collection[str] | None = None) -> None:
        if not urls:
            raise ValueError("no shard to read (did the preprocessing job finish any?)")
        self.urls = list(urls)
        self.fields = tuple(fields) if fields is not None else None     # None: every field
        self.samples_per_rank = int(samples_per_rank)
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.convert = convert
        self.max_empty_shards = max_empty_shards
        self._rank, self._world = rank, world_size
        self.epoch = 0
        self.skipped = SkipCounter()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.samples_per_rank

    def _topology(self) -> tuple[int, int, int, int]:
        rank, world = rank_and_world()
        rank = self._rank if self._rank is not None else rank
        world = self._world if self._world is not None else world
        info = get_worker_info()
        return rank, world, (info.id if info else 0), (info.num_workers if info else 1)

    def _shards(self, rank: int, world: int, worker: int, workers: int) -> Iterator[str]:
        rng = np.random.default_rng([self.seed, self.epoch, rank, worker])
        if self.resampled:
            while True:
                yield self.urls[int(rng.integers(len(self.urls)))]
        mine = self.urls[rank::world] or self.urls            # more ranks than shards: share
        mine = mine[worker::workers] or mine
        while True:
            yield from mine

    def _source(self, rank: int, world: int, worker: int, workers: int) -> Iterator[dict]:
        """Shard urls; an error once ``max_empty_shards`` in a row gave no good sample."""
        for url in self._shards(rank, world, worker, workers):
            self._since_good += 1
            if self._since_good > self.max_empty_shards:
                raise RuntimeError(f"{self.max_empty_shards} shards in a row gave no readable sample "
                                   f"(skipped {dict(self.skipped.counts)}; last: {self.skipped.last})")
            yield {"url": url}

    def __iter__(self) -> Iterator:
        import webdataset as wds
        from webdataset.tariterators import tarfile_samples

        rank, world, worker, workers = self._topology()
        quota = self.samples_per_rank // workers + (worker < self.samples_per_rank % workers)
        if quota == 0:
            return
        self._since_good = 0
        samples = tarfile_samples(self._source(rank, world, worker, workers), handler=self.skipped)
        samples = self._decoded(samples)
        if self.shuffle_buffer > 1:
            samples = wds.filters._shuffle(samples, self.shuffle_buffer, self.shuffle_buffer // 2,
                                           random.Random(f"{self.seed}-{self.epoch}-{rank}-{worker}"))
        yield from itertools.islice(samples, quota)

    def _decoded(self, raw: Iterator[dict]) -> Iterator:
        for sample in raw:
            try:
                decoded = decode_sample(sample, self.fields)
            except Exception as exc:  # noqa: BLE001 - skipped and counted
                self.skipped(exc)
                continue
            self._since_good = 0
            yield self.convert(decoded, self.skipped.total) if self.convert else decoded


def collate(samples: list[dict]) -> dict:
    """Stack tensors (equal shapes within a batch); keep keys and ids as lists."""
    out = {}
    for name, value in samples[0].items():
        if isinstance(value, torch.Tensor):
            out[name] = torch.stack([s[name] for s in samples])
        elif isinstance(value, dict):
            out[name] = {k: torch.stack([s[name][k] for s in samples]) for k in value}
        else:
            out[name] = [s[name] for s in samples]
    return out


def make_loader(source, samples_per_rank: int, batch_size: int, num_workers: int = 2,
                split: str | None = "train", **kwargs) -> torch.utils.data.DataLoader:
    dataset = ShardDataset(shard_urls(source, split), samples_per_rank, **kwargs)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                       collate_fn=collate, persistent_workers=num_workers > 0,
                                       drop_last=True)


__all__ = ["ShardDataset", "SkipCounter", "collate", "make_loader", "shard_urls", "to_torch"]
