"""What the reader decodes: member bytes go through the shuffle buffer and are decoded after it,
only the fields asked for, only the first frames a window at frame 0 reads; and the shard plan
interleaves identities from a seeded permutation of clips."""
import numpy as np
import pytest
from sample_factory import write_random_shards

from preprocessing.clip_records import ClipItem
from preprocessing.shard_format import plan_shards
from training.data.shards import ShardDataset, shard_urls


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """3 shards of 2 clips x 2 samples of 6 frames at 32²."""
    root = tmp_path_factory.mktemp("fields")
    return root, write_random_shards(root, clips=5, frames=6, size=32)


def test_the_shuffle_buffer_holds_bytes_and_decoding_follows_it(shards):
    root, originals = shards
    ds = ShardDataset(shard_urls(root), 8, shuffle_buffer=8, seed=1, convert=None, rank=0, world_size=1)
    decoded = []
    decode = ds._decode
    ds._decode = lambda raw: (decoded.append(raw["__key__"]), decode(raw))[1]
    it = iter(ds)
    first = next(it)
    assert decoded == [first.key]          # the buffer was filled with bytes: one sample decoded so far
    rest = [s.key for s in it]
    assert len(rest) == 7 and decoded == [first.key, *rest]
    keys = [first.key, *rest]
    plain = [s.key for s in ShardDataset(shard_urls(root), 8, seed=1, convert=None, rank=0, world_size=1)]
    assert set(keys) <= set(originals) and keys != plain      # shuffled (a buffer over the same stream)
    again = [s.key for s in ShardDataset(shard_urls(root), 8, shuffle_buffer=8, seed=1, convert=None, rank=0,
                                         world_size=1)]
    assert again == keys                   # and reproducible


def test_only_the_fields_and_frames_asked_for_are_decoded(shards):
    root, originals = shards
    ds = ShardDataset(shard_urls(root), 4, resampled=False, convert=None, rank=0, world_size=1,
                      fields=("frames", "smplx"), max_frames=3)
    for s in ds:
        o = originals[s.key]
        assert s.normals is None and s.depth is None and s.silhouette is None and s.face_mask is None
        assert s.valid is None and s.dynamic_offsets is None
        assert s.frames.shape[0] == 3 and np.array_equal(s.frames, o.frames[:3])
        assert s.smplx["expression"].shape[0] == 3 and s.smplx["betas"].shape == o.smplx["betas"].shape
    # nothing per-frame decoded (and no frame range in the meta): the count is unknown, nothing is dropped
    none = ShardDataset(shard_urls(root), 4, resampled=False, convert=None, rank=0, world_size=1, fields=(),
                        min_frames=6)
    assert len(list(none)) == 4 and none.skipped.total == 0


def test_the_plan_interleaves_identities_and_is_a_pure_function_of_clips_and_seed():
    items = [ClipItem(f"id{i}_c{c}", f"/v/{i}_{c}.mp4", f"id{i}") for i in range(3) for c in range(4)]
    plan = plan_shards(items, 3, "cfg", seed=0)
    assert [len(s.clips) for s in plan] == [3, 3, 3, 3]
    for spec in plan:                       # 3 clips per shard, 3 identities: one clip of each
        assert len({c.identity_id for c in spec.clips}) == 3, [c.clip_id for c in spec.clips]
    same = plan_shards(list(reversed(items)), 3, "cfg", seed=0)
    assert [[c.clip_id for c in s.clips] for s in same] == [[c.clip_id for c in s.clips] for s in plan]
    assert [s.fingerprint for s in same] == [s.fingerprint for s in plan]
    other = plan_shards(items, 3, "cfg", seed=1)
    assert [[c.clip_id for c in s.clips] for s in other] != [[c.clip_id for c in s.clips] for s in plan]
