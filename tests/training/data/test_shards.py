"""The training reader: schema decoding, rank/worker splitting, fixed epochs, corrupt shards."""
import io
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sample_factory import random_sample, write_random_shards

from preprocessing.sample_schema import encode_sample
from training.data.shards import ShardDataset, make_loader, shard_urls


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """3 shards of uneven size: 4, 4 and 2 samples (2 per clip)."""
    root = tmp_path_factory.mktemp("shards")
    return root, write_random_shards(root, clips=5)


def test_round_trip_is_bit_exact(shards):
    root, originals = shards
    urls = shard_urls(root, "train")
    assert len(urls) == 3
    seen = list(ShardDataset(urls, 10, resampled=False, convert=None, rank=0, world_size=1))
    assert sorted(s.key for s in seen) == sorted(originals)
    for s in seen:
        o = originals[s.key]
        assert np.array_equal(s.frames, o.frames) and np.array_equal(s.normals, o.normals)
        assert np.array_equal(s.depth, o.depth) and np.array_equal(s.dynamic_offsets, o.dynamic_offsets)
        assert all(np.array_equal(s.smplx[k], o.smplx[k]) for k in o.smplx)


def test_ranks_get_disjoint_shards_and_equal_epochs(shards):
    root, _ = shards
    urls = shard_urls(root, "train")
    per_rank = [list(ShardDataset(urls, 7, resampled=False, convert=None, rank=r, world_size=2))
                for r in range(2)]
    assert [len(p) for p in per_rank] == [7, 7]            # uneven shards, same epoch length
    keys = [{s.key for s in p} for p in per_rank]
    assert not keys[0] & keys[1]                           # shards split by rank
    clips = [{k.split("_")[0] for k in ks} for ks in keys]
    in_shard = [{k.split("_")[0] for k in _shard_keys(u)} for u in urls]
    assert clips == [in_shard[0] | in_shard[2], in_shard[1]]   # shards 0 and 2 to rank 0, shard 1 to rank 1


def _shard_keys(url: str) -> list[str]:
    with tarfile.open(url) as tar:
        return sorted({m.name.split(".")[0] for m in tar.getmembers()})


def test_resampled_stream_is_seeded_and_sized(shards):
    root, _ = shards
    urls = shard_urls(root)
    a = [s.key for s in ShardDataset(urls, 12, seed=1, convert=None, rank=0, world_size=1)]
    b = [s.key for s in ShardDataset(urls, 12, seed=1, convert=None, rank=0, world_size=1)]
    c = [s.key for s in ShardDataset(urls, 12, seed=1, convert=None, rank=1, world_size=2)]
    assert len(a) == 12 and a == b and a != c


def test_loader_with_workers_collates_fixed_epoch(shards):
    root, _ = shards
    loader = make_loader(root, samples_per_rank=8, batch_size=2, num_workers=2, resampled=True)
    batches = list(loader)
    assert len(batches) == 4
    b = batches[0]
    assert b["frames"].shape == (2, 4, 32, 32, 3) and b["frames"].dtype == torch.uint8
    assert b["smplx"]["expression"].shape == (2, 4, 100) and len(b["key"]) == 2


def test_loader_decodes_only_the_fields_asked_for(shards):
    root, _ = shards
    loader = make_loader(root, samples_per_rank=4, batch_size=2, num_workers=0, resampled=False,
                         fields=("frames", "normals"))
    batch = next(iter(loader))
    assert batch["frames"].shape == (2, 4, 32, 32, 3) and batch["normals"].shape == (2, 4, 32, 32, 3)
    assert not {"smplx", "depth", "silhouette", "dynamic_offsets"} & set(batch)
    full = next(iter(make_loader(root, samples_per_rank=4, batch_size=2, num_workers=0, resampled=False)))
    assert batch["key"] == full["key"] and torch.equal(batch["frames"], full["frames"])


def _corrupt_copies(root, tmp_path):
    urls = shard_urls(root)
    data = open(urls[0], "rb").read()
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    # a well-formed tar whose members are broken: one sample lacks offsets, one has bad cond bytes
    bad_members = tmp_path / "bad_members.tar"
    raw = encode_sample(random_sample("bad", 0))
    with tarfile.open(bad_members, "w") as tar:
        for key, drop, mangle in (("bad_s000", "offsets.npz", None), ("bad_s001", None, "cond.npz")):
            for member, payload in raw.items():
                if member == "__key__" or member == drop:
                    continue
                payload = payload[:50] if member == mangle else payload
                info = tarfile.TarInfo(f"{key}.{member}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return urls, [str(truncated), str(garbage), str(bad_members)]


def test_corrupt_shards_and_members_are_skipped_and_counted(shards, tmp_path):
    root, originals = shards
    urls, bad = _corrupt_copies(root, tmp_path)
    ds = ShardDataset(bad + urls, 40, resampled=False, convert=None, rank=0, world_size=1)
    t0 = time.perf_counter()
    seen = list(ds)
    assert time.perf_counter() - t0 < 30
    assert len(seen) == 40 and {s.key for s in seen} <= set(originals)
    assert ds.skipped.total >= 3                 # bad tar(s) and both broken samples
    assert ds.skipped.counts["SchemaError"] >= 2


def test_all_corrupt_is_an_error_not_a_spin(shards, tmp_path):
    root, _ = shards
    _, bad = _corrupt_copies(root, tmp_path)
    ds = ShardDataset(bad[1:2], 5, convert=None, max_empty_shards=20, rank=0, world_size=1)
    with pytest.raises(RuntimeError, match="no readable sample"):
        list(ds)


def test_skips_are_counted_across_dataloader_workers(shards, tmp_path):
    """Each worker counts its own skips; the loader sums them from the batches (the dataset
    object in the main process never sees a worker's count)."""
    root, _ = shards
    urls, bad = _corrupt_copies(root, tmp_path)
    in_process = ShardDataset(bad + urls, 16, resampled=False, rank=0, world_size=1)
    list(in_process)
    loader = make_loader(bad + urls, samples_per_rank=16, batch_size=2, num_workers=2, resampled=False)
    batches = list(loader)
    assert len(batches) == 8 and loader.dataset.skipped.total == 0     # the workers' copies counted
    per_worker = {}
    for b in batches:
        for w, n in zip(b["reader_worker"], b["reader_skipped"]):
            per_worker[w] = max(per_worker.get(w, 0), n)
    assert set(per_worker) == {"0-0", "0-1"}
    assert loader.skipped == sum(per_worker.values()) >= 3
    assert in_process.skipped.total >= 3


def test_decoded_cache_serves_the_same_stream_from_memory(shards, tmp_path):
    """With ``cache_mb`` the stream (keys and arrays, epoch by epoch) is the uncached one, and
    shards read once are served from memory: once all are cached, an epoch reads no file."""
    import shutil

    root, _ = shards
    shutil.copytree(root, tmp_path / "copy")
    urls = shard_urls(tmp_path / "copy", "train")
    plain = ShardDataset(urls, 30, shuffle_buffer=4, seed=3, convert=None, rank=0, world_size=1)
    cached = ShardDataset(urls, 30, shuffle_buffer=4, seed=3, convert=None, rank=0, world_size=1, cache_mb=64)
    streams = {}
    for epoch in range(4):
        plain.set_epoch(epoch)
        streams[epoch] = list(plain)
    for epoch in range(3):
        cached.set_epoch(epoch)
        got = list(cached)
        assert [s.key for s in got] == [s.key for s in streams[epoch]]
        assert all(np.array_equal(x.frames, y.frames) and np.array_equal(x.normals, y.normals)
                   for x, y in zip(got, streams[epoch]))
    assert sorted(cached._cache) == sorted(urls) and 0 < cached._cached_bytes <= 64 * 2**20
    for url in urls:
        Path(url).unlink()
    cached.set_epoch(3)
    assert [s.key for s in cached] == [s.key for s in streams[3]] and cached.skipped.total == 0


def test_decoded_cache_respects_its_budget(shards):
    root, _ = shards
    urls = shard_urls(root, "train")
    tiny = ShardDataset(urls, 10, resampled=False, convert=None, rank=0, world_size=1, cache_mb=1e-6)
    assert len(list(tiny)) == 10 and tiny._cache == {} and tiny._cached_bytes == 0
