"""Training reader of the preprocessing job's WebDataset shards, addressed by position.

Samples are decoded by :mod:`preprocessing.sample_schema`, the module the writer uses. Each
shard is indexed once per process from its tar headers (:mod:`.shard_index`: each sample's
members and byte offsets), and a sample is read by range when the stream reaches it, then
decoded: samples are shuffled as positions, before any byte is read or decoded.

* ``resampled=True`` (training): every (rank, worker) has its own seeded stream of **blocks**.
  Block ``b`` draws shards with replacement (seeded by seed, epoch, rank, worker and ``b``)
  until it holds ``shuffle_buffer`` samples, and yields all of their samples in a seeded
  order. A position is (block, offset): the stream can start anywhere by building that one
  block (tar headers of its shards), without reading or decoding what came before, which is
  how a resumed run continues (``ShardDataset.start``, :class:`ResumePoint`, set by the data
  module). Every sample carries the position after it (``reader_pos``);
* ``resampled=False`` (evaluation): shards are split by rank, then by worker, and cycled, each
  read in order;
* either way each rank yields the same number of samples per epoch (its quota), so uneven
  shards cannot leave one DDP rank waiting for another;
* ``fields`` picks what is decoded (default all; a generator step needs ``("frames",
  "normals")``, which decodes in half the time), see ``sample_schema.FIELDS``;
* a corrupt shard or member (bad tar, truncated file, undecodable member) is skipped and
  counted (:class:`SkipCounter`, the reader's ``handler``); ``max_empty_shards`` empty shards
  (or blocks without one good sample) in a row is an error rather than a silent spin;
* a sample shorter than ``min_frames`` (a training window's span: a clip shorter than one
  segment is written as one short sample) is dropped and counted the same way, as
  ``ShortSample`` in ``skipped.counts`` (and in ``reader_skipped``).

Skips across DataLoader workers: each worker counts its own, and every sample carries its
worker's running count (``reader_skipped``, ``reader_worker``); :class:`ShardLoader` sums the
latest count of each worker as batches arrive (``loader.skipped``), and :class:`SkipTally`
does the same for any consumer of the batches. ``ShardDataset.io`` counts what this process
indexed, read and decoded.

Precomputed latents (``latents=LATENTS_DIR/<codec_id>/shards``, written by
``pipelines.encode_latents``): a shard whose sidecar is there and was made from the same bytes
(the markers' sha256) has each sample merged with the sidecar's sample of the same key, and its
samples carry ``latents`` and ``reference_latent``; other shards' samples come without them
(the trainer encodes those on the fly). A sidecar lacking a key is counted
(``LatentSidecarMismatch``) and that sample comes without it. Driving normals
(``normals=...``, ``pipelines.render_normals``) are merged the same way.

Decoded-sample cache (``cache_mb``, off by default): a worker keeps the decoded samples it has
read, up to that many MiB, and serves later draws of them from memory (same samples in the
same order, so the stream and the data position are unchanged). For corpora that fit in memory
(the tiny CPU benchmark: decoding was 27 % of a training step, README); each DataLoader worker
holds its own copy. Once the budget is spent, further samples are read from disk as usual.
"""
from __future__ import annotations

import glob
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from preprocessing import storage
from preprocessing.latent_schema import MEMBERS as LATENT_MEMBERS
from preprocessing.latent_schema import LatentSample, decode_latent_sample
from preprocessing.normal_schema import MEMBERS as NORMAL_MEMBERS
from preprocessing.normal_schema import NormalSample, decode_normal_sample
from preprocessing.sample_schema import ShardSample, decode_sample
from preprocessing.shard_format import MARKER_SUFFIX

from .shard_index import SampleSpan, index_tar, read_sample


def shard_urls(source: str | os.PathLike | list[str], split: str | None = None) -> list[str]:
    """Finished shards of an output folder (those with a done marker: the commit), a glob, or
    a list; the folder is a path or a URL (``s3://bucket/prefix``), listed once."""
    import fnmatch

    if isinstance(source, (list, tuple)):
        return list(source)
    source = os.fspath(source)
    if storage.is_url(source) or os.path.isdir(storage.local_path(source)):
        names = storage.listdir(storage.url_join(source, "shards"))
        folder = storage.url_join(source, "shards") if names else source
        names = names or storage.listdir(source)
        present = set(names)
        pattern = f"{split}-*.tar" if split else "*.tar"
        return [storage.url_join(folder, n) for n in names
                if fnmatch.fnmatch(n, pattern) and n[:-len(".tar")] + MARKER_SUFFIX in present]
    return sorted(glob.glob(storage.local_path(source)))


@dataclass
class SkipCounter:
    """Counts what was skipped, by exception type; the reader's ``handler``. It also guards
    against a stream with nothing readable (see :meth:`shard_started`)."""

    max_empty_shards: int = 50
    counts: Counter = field(default_factory=Counter)
    last: str = ""
    since_good: int = 0               # shards (blocks) started since the last good sample
    carried: int = 0                  # skips before a resumed pass (its worker's count at the checkpoint)

    def __call__(self, exc: BaseException) -> bool:
        self.counts[type(exc).__name__] += 1
        self.last = str(exc)[:300]
        return True                                   # keep going

    @property
    def total(self) -> int:
        return self.carried + sum(self.counts.values())

    def shard_started(self) -> None:
        self.since_good += 1
        if self.since_good > self.max_empty_shards:
            self.give_up()

    def give_up(self) -> None:
        raise RuntimeError(f"{self.max_empty_shards} shards in a row gave no readable sample "
                           f"(skipped {dict(self.counts)}; last: {self.last})")


class SkipTally:
    """Skips summed over DataLoader workers from the batches themselves: each worker's
    latest running count (samples carry ``reader_worker`` and ``reader_skipped``)."""

    def __init__(self) -> None:
        self.by_worker: dict[str, int] = {}

    def update(self, batch: dict) -> None:
        for worker, count in zip(batch.get("reader_worker", ()), batch.get("reader_skipped", ())):
            count = int(count)
            if count > self.by_worker.get(worker, -1):
                self.by_worker[worker] = count

    @property
    def total(self) -> int:
        return sum(self.by_worker.values())


def rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


#: sample field -> the dtype its tensor gets (None: as stored; frames and normals stay uint8
#: until the GPU)
TENSOR_FIELDS = {"frames": None, "normals": None, "silhouette": None, "face_mask": None, "valid": None,
                 "depth": np.float32, "dynamic_offsets": np.float32, "static_offsets": np.float32,
                 "face_vertex_ids": np.int64}


#: sidecar kind -> its members (merged into the shard's sample by key)
SIDECAR_MEMBERS = {"latents": LATENT_MEMBERS, "normals": NORMAL_MEMBERS}


def to_torch(sample: ShardSample, latents: LatentSample | None = None, normals: NormalSample | None = None) -> dict:
    """Schema sample (and its precomputed latents and driving normals) -> tensors a training step
    takes. Fields the reader did not decode are left out."""
    out = {"key": sample.key}
    if latents is not None:
        out["latents"] = torch.from_numpy(latents.video)
        out["reference_latent"] = torch.from_numpy(latents.reference)
    if normals is not None:
        out["driving_normals"] = torch.from_numpy(normals.normals)
    for name, dtype in TENSOR_FIELDS.items():
        value = getattr(sample, name)
        if value is not None:
            out[name] = torch.from_numpy(value if dtype is None else value.astype(dtype))
    if sample.smplx is not None:
        out["smplx"] = {k: torch.from_numpy(v) for k, v in sample.smplx.items()}
    out["identity_id"] = sample.meta.get("identity_id", "")
    return out


class LatentSidecarMismatch(ValueError):
    """A sidecar (latents or driving normals) whose keys do not follow its shard's."""


def matching_sidecars(urls: list[str], latents: str | os.PathLike) -> dict[str, str]:
    """url -> sidecar tar, for the shards whose sidecar was made from the same shard bytes
    (the sidecar marker's ``source_sha256`` equals the shard marker's ``sha256``)."""
    import json

    found = {}
    present = set(storage.listdir(latents))
    for url in urls:
        name = storage.url_name(url)
        stem = name[:-len(".tar")]
        if name not in present or stem + MARKER_SUFFIX not in present:
            continue
        try:
            source = json.loads(storage.get_bytes(url[:-len(".tar")] + MARKER_SUFFIX))
            marker = json.loads(storage.get_bytes(storage.url_join(latents, stem + MARKER_SUFFIX)))
        except (OSError, ValueError):
            continue
        if marker.get("source_sha256") == source.get("sha256"):
            found[url] = storage.url_join(os.fspath(latents), name)
    return found


class ShortSample(ValueError):
    """A sample with fewer frames than the reader's ``min_frames`` (dropped and counted)."""


def _split(items: list, index: int, count: int) -> list:
    """Every ``count``-th item from ``index``; all of them when that leaves none (more ranks or
    workers than shards: they share rather than stall)."""
    return items[index::count] or items


@dataclass
class ResumePoint:
    """Where each loader worker of a rank starts its pass (the data module derives it from its
    checkpoint state): logical worker ids, since a resumed DataLoader starts its round robin at
    physical worker 0 while the interrupted one was due to read from ``rotation``."""

    rotation: int = 0                                  # physical worker p plays (p + rotation) % workers
    #: logical worker -> its next (block, offset); None: derive it from ``consumed`` (exact when
    #: nothing was dropped); a worker missing from the dict starts its stream afresh
    positions: dict[int, tuple[int, int]] | None = None
    consumed: dict[int, int] = field(default_factory=dict)     # logical worker -> samples it gave
    remaining: dict[int, int] = field(default_factory=dict)    # logical worker -> samples still due
    skipped: dict[int, int] = field(default_factory=dict)      # logical worker -> its skips so far


_MISSING = object()


class ShardDataset(IterableDataset):
    """A fixed-length epoch of decoded samples for this rank (see the module docstring)."""

    def __init__(self, urls: list[str], samples_per_rank: int, resampled: bool = True,
                 shuffle_buffer: int = 0, seed: int = 0, convert: Callable | None = to_torch,
                 max_empty_shards: int = 50, rank: int | None = None, world_size: int | None = None,
                 fields: Collection[str] | None = None, latents: str | os.PathLike | None = None,
                 cache_mb: float = 0, min_frames: int = 0, normals: str | os.PathLike | None = None,
                 max_frames: int | None = None) -> None:
        if not urls:
            raise ValueError("no shard to read (did the preprocessing job finish any?)")
        self.urls = list(urls)
        #: sidecar kind -> {shard url: sidecar tar}, for the kinds given (latents first)
        self.sidecar_maps = {kind: matching_sidecars(self.urls, folder)
                             for kind, folder in (("latents", latents), ("normals", normals)) if folder is not None}
        self.sidecars = self.sidecar_maps.get("latents", {})
        self.max_frames = max_frames            # decode only the first frames (a window at frame 0)
        self.fields = tuple(fields) if fields is not None else None     # None: every field
        self.samples_per_rank = int(samples_per_rank)
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer    # a training block holds at least this many samples
        self.seed = seed
        self.convert = convert
        self._rank, self._world = rank, world_size
        self.epoch = 0
        self.start: ResumePoint | None = None   # set by the data module for a resumed pass
        self.skipped = SkipCounter(max_empty_shards)
        self.min_frames = int(min_frames)      # shorter samples are dropped (ShortSample)
        #: what this process read: shards indexed, samples read (bytes) and decoded
        self.io: Counter = Counter()
        self._indexes: dict[str, list[SampleSpan]] = {}          # tar -> its samples (this process)
        self._side_indexes: dict[str, dict[str, SampleSpan]] = {}  # sidecar tar -> key -> its sample
        self.cache_bytes = int(cache_mb * 2**20)
        self._cache: dict[str, dict[int, object]] = {}   # url -> sample index -> decoded (this process)
        self._cached_bytes = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.samples_per_rank

    def quota(self, worker: int, workers: int) -> int:
        """Samples a loader worker gives per pass (the rank's samples split over its workers)."""
        return self.samples_per_rank // workers + (worker < self.samples_per_rank % workers)

    def _topology(self) -> tuple[int, int, int, int]:
        rank, world = rank_and_world()
        rank = self._rank if self._rank is not None else rank
        world = self._world if self._world is not None else world
        info = get_worker_info()
        return rank, world, (info.id if info else 0), (info.num_workers if info else 1)

    # -- the stream: positions -> (shard, sample index) -------------------------------------
    def index(self, url: str) -> list[SampleSpan]:
        """The samples of a shard (its tar headers, read once per process; errors counted)."""
        if url not in self._indexes:
            self.io["shards_indexed"] += 1
            self._indexes[url] = index_tar(url, self.skipped)
        return self._indexes[url]

    def block(self, rank: int, worker: int, number: int) -> list[tuple[str, int]]:
        """Block ``number`` of a (rank, worker)'s training stream: shards drawn with replacement
        (seeded by seed, epoch, rank, worker and block) until it holds ``shuffle_buffer`` samples,
        all of their samples in a seeded order, as (shard, sample index). Reads tar headers only."""
        rng = random.Random(f"{self.seed}-{self.epoch}-{rank}-{worker}-{number}")
        members: list[tuple[str, int]] = []
        empty = 0
        while len(members) < max(self.shuffle_buffer, 1):
            url = self.urls[rng.randrange(len(self.urls))]
            count = len(self.index(url))
            empty = empty + 1 if count == 0 else 0
            if empty > self.skipped.max_empty_shards:
                self.skipped.give_up()
            members += [(url, k) for k in range(count)]
        rng.shuffle(members)
        return members

    def position_after(self, rank: int, worker: int, samples: int) -> tuple[int, int]:
        """The (block, offset) that follows ``samples`` samples of a (rank, worker)'s training
        stream, when none of them was dropped: arithmetic on block sizes, no sample read."""
        number = 0
        while True:
            size = len(self.block(rank, worker, number))
            if samples < size:
                return number, samples
            samples, number = samples - size, number + 1

    def _training_positions(self, rank: int, worker: int, start: tuple[int, int]) -> Iterator[tuple]:
        number, offset = start
        while True:
            members = self.block(rank, worker, number)
            for k in range(offset, len(members)):
                yield (*members[k], (number, k + 1))
            number, offset = number + 1, 0

    def _evaluation_positions(self, rank: int, world: int, worker: int, workers: int) -> Iterator[tuple]:
        """This worker's shards (split by rank, then worker), each read in order, cycled."""
        mine = _split(_split(self.urls, rank, world), worker, workers)
        slot = 0
        while True:
            for url in mine:
                count = len(self.index(url))
                if count == 0:
                    self.skipped.shard_started()
                for k in range(count):
                    yield url, k, (slot, k + 1)
                slot += 1

    def __iter__(self) -> Iterator:
        rank, world, worker, workers = self._topology()
        start, position = self.start, (0, 0)
        logical = (worker + start.rotation) % workers if start is not None else worker
        quota = self.quota(logical, workers)
        if start is not None and self.resampled:
            quota = start.remaining.get(logical, quota)
            self.skipped.carried = start.skipped.get(logical, 0) - sum(self.skipped.counts.values())
            if start.positions is not None:
                position = tuple(start.positions.get(logical, position))
            elif start.consumed.get(logical, 0):
                position = self.position_after(rank, logical, start.consumed[logical])
        if quota <= 0:
            return iter(())
        positions = (self._training_positions(rank, logical, position) if self.resampled
                     else self._evaluation_positions(rank, world, logical, workers))
        return self._samples(positions, quota, f"{rank}-{logical}")

    def _samples(self, positions: Iterator[tuple], quota: int, worker_id: str) -> Iterator:
        """Decoded samples at the positions until ``quota`` of them; what cannot be read or is
        dropped is counted. A block (or evaluation shard) without one good sample counts towards
        ``max_empty_shards``."""
        self.skipped.since_good = 0
        given, block, fruitful = 0, None, True
        for url, number, position in positions:
            if position[0] != block:
                if not fruitful:
                    self.skipped.shard_started()
                block, fruitful = position[0], False
            try:
                item = self._load(url, number)
            except Exception as exc:  # noqa: BLE001 - counted, as webdataset's handler would
                self.skipped(exc)
                continue
            self.skipped.since_good, fruitful = 0, True
            yield self._tag(item, worker_id, position)
            given += 1
            if given >= quota:
                return

    # -- reading one sample ----------------------------------------------------------------
    def _load(self, url: str, number: int):
        """Sample ``number`` of a shard, decoded (from the cache where it holds it)."""
        cached = self._cache.get(url, {}).get(number, _MISSING)
        if cached is not _MISSING:
            if isinstance(cached, BaseException):
                raise cached
            return cached
        try:
            item = self._decode(self._raw(url, number))
        except OSError:
            raise                                  # may be transient: not remembered
        except Exception as exc:
            self._remember(url, number, exc)
            raise
        self._remember(url, number, item)
        return item

    def _remember(self, url: str, number: int, item) -> None:
        if self.cache_bytes <= 0:
            return
        size = 0 if isinstance(item, BaseException) else _nbytes(item)
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache.setdefault(url, {})[number] = item
            self._cached_bytes += size

    def _raw(self, url: str, number: int) -> dict:
        """A sample's member bytes, merged with its sidecars' (by key; a sidecar without the key
        is counted as ``LatentSidecarMismatch`` and left out)."""
        span = self.index(url)[number]
        raw = read_sample(url, span)
        self.io["samples_read"] += 1
        for kind, sidecars in self.sidecar_maps.items():
            side = sidecars.get(url)
            if side is None:
                continue
            if side not in self._side_indexes:
                self._side_indexes[side] = {s.key: s for s in index_tar(side, self.skipped)}
            side_span = self._side_indexes[side].get(span.key)
            if side_span is None:
                self.skipped(LatentSidecarMismatch(f"{side} has no sample {span.key} of {url}"))
                continue
            raw.update({k: v for k, v in read_sample(side, side_span).items() if k in SIDECAR_MEMBERS[kind]})
        return raw

    def _decode(self, raw: dict):
        """Raw members -> the sample (only ``fields``, only the first ``max_frames``), or
        (sample, latents[, normals]) with sidecars (None where a shard has none)."""
        self.io["samples_decoded"] += 1
        sample = decode_sample(raw, self.fields, self.max_frames)
        extras = {}
        if "latents" in self.sidecar_maps:
            extras["latents"] = decode_latent_sample(raw) if LATENT_MEMBERS[0] in raw else None
        if "normals" in self.sidecar_maps:
            extras["normals"] = decode_normal_sample(raw, self.max_frames) if NORMAL_MEMBERS[0] in raw else None
        normals = extras.get("normals")
        frames = sample.num_frames or _meta_frames(sample.meta) or (len(normals.normals) if normals else 0)
        if frames and frames < self.min_frames:             # 0: nothing per-frame decoded, count unknown
            raise ShortSample(f"sample {sample.key} has {frames} frames, the window spans {self.min_frames}")
        return (sample, *extras.values()) if self.sidecar_maps else sample

    def _tag(self, item, worker_id: str, position: tuple[int, int]):
        if self.convert is None:
            return item
        if self.sidecar_maps:
            sample, *sides = item
            out = self.convert(sample, **dict(zip(self.sidecar_maps, sides)))
        else:
            out = self.convert(item)
        if isinstance(out, dict):
            out["reader_worker"], out["reader_skipped"] = worker_id, self.skipped.total
            out["reader_pos"] = position
        return out


def _meta_frames(meta: dict) -> int:
    """A sample's frame count from its meta (``frame_stop - frame_start``; 0 if absent): for a
    sample decoded without any per-frame field."""
    try:
        return int(meta["frame_stop"]) - int(meta["frame_start"])
    except (KeyError, TypeError, ValueError):
        return 0


def _nbytes(obj) -> int:
    """Bytes of the arrays in a decoded sample (dataclass, tuple, dict or array)."""
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(v) for v in obj)
    if hasattr(obj, "__dataclass_fields__"):
        return sum(_nbytes(getattr(obj, name)) for name in obj.__dataclass_fields__)
    return 0


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


class ShardLoader(torch.utils.data.DataLoader):
    """A DataLoader whose ``skipped`` is right across its worker processes: it reads the
    per-worker counts that each batch carries (see :class:`SkipTally`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tally = SkipTally()

    @property
    def skipped(self) -> int:
        in_process = self.dataset.skipped.total if self.num_workers == 0 else 0
        return max(self.tally.total, in_process)

    def __iter__(self):
        for batch in super().__iter__():
            if isinstance(batch, dict):
                self.tally.update(batch)
            yield batch


def make_loader(source, samples_per_rank: int, batch_size: int, num_workers: int = 2,
                split: str | None = "train", **kwargs) -> ShardLoader:
    dataset = ShardDataset(shard_urls(source, split), samples_per_rank, **kwargs)
    return ShardLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                       persistent_workers=num_workers > 0, drop_last=True)


__all__ = ["LatentSidecarMismatch", "ShardDataset", "ShardLoader", "ShortSample", "SkipCounter", "SkipTally", "collate",
           "make_loader", "matching_sidecars", "shard_urls", "to_torch"]
