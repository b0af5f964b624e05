"""Training reader of the preprocessing job's WebDataset shards, on webdataset's own pipeline.

Samples are decoded by :mod:`preprocessing.sample_schema`, the module the writer uses.

* ``resampled=True`` (training): every (rank, worker) draws shards with replacement from its
  own seeded stream (``wds.ResampledShards``, deterministic), so no rank ever runs out;
* ``resampled=False`` (evaluation): shards are split by rank, then by worker, and cycled;
* either way each rank yields the same number of samples per epoch (``with_epoch``), so uneven
  shards cannot leave one DDP rank waiting for another;
* ``fields`` picks what is decoded (default all; a generator step needs ``("frames",
  "normals")``, which decodes in half the time), see ``sample_schema.FIELDS``;
* a corrupt shard or member (bad tar, truncated file, undecodable member) is skipped and
  counted (:class:`SkipCounter`, the pipeline's ``handler``); ``max_empty_shards`` shards in a
  row without one good sample is an error rather than a silent spin;
* a sample shorter than ``min_frames`` (a training window's span: a clip shorter than one
  segment is written as one short sample) is dropped and counted the same way, as
  ``ShortSample`` in ``skipped.counts`` (and in ``reader_skipped``).

Skips across DataLoader workers: each worker counts its own, and every sample carries its
worker's running count (``reader_skipped``, ``reader_worker``); :class:`ShardLoader` sums the
latest count of each worker as batches arrive (``loader.skipped``), and :class:`SkipTally`
does the same for any consumer of the batches.

Precomputed latents (``latents=LATENTS_DIR/<codec_id>/shards``, written by
``pipelines.encode_latents``): a shard whose sidecar is there and was made from the same bytes
(the markers' sha256) is read in lockstep with it, and its samples carry ``latents`` and
``reference_latent``; other shards' samples come without them (the trainer encodes those on the
fly). A sidecar out of step with its shard is skipped and counted (``LatentSidecarMismatch``).

Decoded-sample cache (``cache_mb``, off by default): a worker keeps the decoded samples of the
shards it has read, up to that many MiB, and serves later draws of those shards from memory
(same samples in the same order, so the stream and the data position are unchanged). For
corpora that fit in memory (the tiny CPU benchmark: decoding was 27 % of a training step,
README); each DataLoader worker holds its own copy. Once the budget is spent, further shards
are read from disk as usual.

Why a ``wds.DataPipeline`` of webdataset's public stages rather than the ``wds.WebDataset``
class: that class's resampled mode seeds from the process id and the clock (not reproducible),
and its splitters give a worker with no shard an empty stream that ``with_epoch`` ends early.
"""
from __future__ import annotations

import glob
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterable, Iterator

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


def tar_samples(handler: Callable[[Exception], bool]) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """webdataset's ``tarfile_to_samples`` stage with each shard opened through
    :mod:`preprocessing.storage` (paths, ``file://``, ``s3://``: streamed, webdataset's own
    ``gopen`` has no object-store scheme)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    def open_streams(src: Iterable[dict]) -> Iterator[dict]:
        for sample in src:
            try:
                stream = storage.open_url(sample["url"])
            except Exception as exn:  # noqa: BLE001 - the handler decides (skip or raise)
                exn.args = exn.args + (sample["url"],)
                if not handler(exn):
                    break
                continue
            try:
                yield {**sample, "stream": stream}     # read to its end before the next is asked for
            finally:
                stream.close()

    def stage(src: Iterable[dict]) -> Iterator[dict]:
        return group_by_keys(tar_file_expander(open_streams(src), handler=handler), handler=handler)

    return stage


@dataclass
class SkipCounter:
    """Counts what was skipped, by exception type; the pipeline's ``handler``. It also
    guards against a stream with nothing readable (see :meth:`shard_started`)."""

    max_empty_shards: int = 50
    counts: Counter = field(default_factory=Counter)
    last: str = ""
    since_good: int = 0               # shards started since the last good sample

    def __call__(self, exc: BaseException) -> bool:
        self.counts[type(exc).__name__] += 1
        self.last = str(exc)[:300]
        return True                                   # keep going

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def shard_started(self) -> None:
        self.since_good += 1
        if self.since_good > self.max_empty_shards:
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
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.convert = convert
        self._rank, self._world = rank, world_size
        self.epoch = 0
        self.skipped = SkipCounter(max_empty_shards)
        self.min_frames = int(min_frames)      # shorter samples are dropped (ShortSample)
        self.cache_bytes = int(cache_mb * 2**20)
        self._cache: dict[str, list] = {}       # url -> its decoded samples (this process)
        self._cached_bytes = 0

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

    def pipeline(self):
        """This (rank, worker)'s ``wds.DataPipeline``: shard urls -> tar members (bytes) ->
        shuffled -> decoded -> converted, ``with_epoch`` its share of the rank's samples. The
        shuffle buffer holds members' bytes, not decoded arrays (with ``cache_mb`` the decoded
        samples are shuffled: the cache serves decoded samples)."""
        import webdataset as wds

        rank, world, worker, workers = self._topology()
        quota = self.samples_per_rank // workers + (worker < self.samples_per_rank % workers)
        if self.resampled:
            worker_seed = rank * 1000 + worker
            shards = wds.ResampledShards(self.urls, seed=self.seed * 100_003 + self.epoch,
                                         worker_seed=lambda: worker_seed, deterministic=True)
            stages = [shards]
        else:
            mine = _split(_split(self.urls, rank, world), worker, workers)
            stages = [wds.SimpleShardList(mine)]
        worker_id = f"{rank}-{worker}"
        shuffle = [wds.shuffle(self.shuffle_buffer, self.shuffle_buffer // 2,
                               rng=random.Random(f"{self.seed}-{self.epoch}-{rank}-{worker}"))
                   ] if self.shuffle_buffer > 1 else []
        if self.cache_bytes > 0:
            stages += [self._guard, self._cached_decode, *shuffle]
        else:
            stages += [self._guard, self._members, *shuffle, wds.map(self._decode, handler=self.skipped)]
        stages.append(wds.map(lambda sample: self._tag(sample, worker_id)))
        return wds.DataPipeline(*stages).with_epoch(quota), quota

    def __iter__(self) -> Iterator:
        pipeline, quota = self.pipeline()
        if quota == 0:
            return iter(())
        self.skipped.since_good = 0
        return iter(pipeline)

    def _guard(self, urls: Iterable[dict]) -> Iterator[dict]:
        for url in urls:
            self.skipped.shard_started()
            yield url

    def _members(self, urls: Iterable[dict]) -> Iterator[dict]:
        """Tar members (bytes) of each shard, merged with its sidecars'."""
        return self._paired(urls) if self.sidecar_maps else tar_samples(self.skipped)(urls)

    def _read_decode(self, urls: Iterable[dict]) -> Iterator:
        """Tar members of each shard (merged with its sidecars') -> decoded samples."""
        import webdataset as wds

        return wds.map(self._decode, handler=self.skipped)(self._members(urls))

    def _cached_decode(self, urls: Iterable[dict]) -> Iterator:
        """:meth:`_read_decode`, served from memory for shards read before (see the module docstring)."""
        for entry in urls:
            url = entry["url"]
            if url in self._cache:
                self.skipped.since_good = 0
                yield from self._cache[url]
                continue
            decoded = []
            for item in self._read_decode([entry]):
                decoded.append(item)
                yield item
            size = sum(_nbytes(item) for item in decoded)
            if decoded and self._cached_bytes + size <= self.cache_bytes:
                self._cache[url] = decoded
                self._cached_bytes += size

    def _paired(self, urls: Iterable[dict]) -> Iterator[dict]:
        """Tar members of each shard, merged with its sidecars' (same keys, same order); a
        sidecar out of step is counted (``LatentSidecarMismatch``) and left out from there."""
        expand = tar_samples(self.skipped)     # a stage: applied to a url stream
        for entry in urls:
            sides = {kind: m[entry["url"]] for kind, m in self.sidecar_maps.items() if entry["url"] in m}
            streams = {kind: iter(expand([{"url": side}])) for kind, side in sides.items()}
            for raw in expand([entry]):
                merged = dict(raw)
                for kind in list(streams):
                    side = next(streams[kind], None)
                    if side is None or side["__key__"] != raw["__key__"]:
                        self.skipped(LatentSidecarMismatch(f"{sides[kind]} is out of step with {entry['url']} at "
                                                           f"{raw['__key__']}"))
                        del streams[kind]
                        continue
                    merged.update({k: v for k, v in side.items() if k in SIDECAR_MEMBERS[kind]})
                yield merged

    def _decode(self, raw: dict):
        """Raw members -> the sample (only ``fields``, only the first ``max_frames``), or
        (sample, latents[, normals]) with sidecars (None where a shard has none)."""
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
        self.skipped.since_good = 0
        return (sample, *extras.values()) if self.sidecar_maps else sample

    def _tag(self, item, worker_id: str):
        if self.convert is None:
            return item
        if self.sidecar_maps:
            sample, *sides = item
            out = self.convert(sample, **dict(zip(self.sidecar_maps, sides)))
        else:
            out = self.convert(item)
        if isinstance(out, dict):
            out["reader_worker"], out["reader_skipped"] = worker_id, self.skipped.total
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
           "make_loader", "matching_sidecars", "shard_urls", "tar_samples", "to_torch"]
