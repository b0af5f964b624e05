"""Resume by position: a resumed pass starts each loader worker at the position its last consumed
sample recorded, so the stream continues exactly (dropped samples included) and a resume reads
and decodes only what it yields, after 3 batches as after 10 000."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from sample_factory import random_sample

from preprocessing.sample_schema import encode_sample
from training.data.datamodule import ShardDataModule, resume_point


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """8 shards of 3 samples (16², 2 frames); the middle sample of every other shard lacks a
    member, so the reader drops it (``SchemaError``) and a worker's stream has holes."""
    import webdataset as wds
    root = tmp_path_factory.mktemp("resume")
    (root / "shards").mkdir()
    for s in range(8):
        with wds.TarWriter(str(root / "shards" / f"train-{s:06d}.tar")) as tar:
            for k in range(3):
                raw = encode_sample(random_sample(f"c{s}", k, frames=2, size=16, seed=10 * s + k))
                if s % 2 == 0 and k == 1:
                    raw.pop("offsets.npz")
                tar.write(raw)
        (root / "shards" / f"train-{s:06d}.done.json").write_text("{}")
    return root


def module(root: Path, samples: int, workers: int = 0, **kwargs) -> ShardDataModule:
    return ShardDataModule(str(root), val_split=None, batch_size=2, samples_per_epoch=samples, num_workers=workers,
                           shuffle_buffer=4, seed=3, **kwargs)


def a_pass(dm: ShardDataModule, record: set[int] = frozenset(), stop: int | None = None):
    """The keys of each batch of a pass (each taken by a step), and the state after the ``record``-th."""
    keys, states, loader = [], {}, dm.train_dataloader()
    for n, batch in enumerate(itertools.islice(loader, stop), 1):
        dm.consumed(batch)
        keys.append(list(batch["key"]))
        if n in record:
            states[n] = dm.state_dict()
    return keys, states, loader


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_pass_continues_the_stream_exactly(corpus, workers):
    full, states, loader = a_pass(module(corpus, 24, workers), record={1, 5, 9})
    assert len(full) == 12
    assert sum(states[9]["ranks"][0]["skipped"].values()) > 0          # samples were dropped on the way
    for k in (1, 5, 9):
        resumed = module(corpus, 24, workers)
        resumed.load_state_dict(states[k])
        assert a_pass(resumed)[0] == full[k:], k


def test_resume_reads_as_much_after_10_000_batches_as_after_3(corpus):
    """The counts of what a resume reads (shards indexed, samples read and decoded) for its next
    3 batches are the same after 3 and after 10 000 batches: only those batches' samples (and the
    dropped ones among them), where fast-forwarding would have decoded 20 000 samples first."""
    samples = 2 * 10_003
    full, states, loader = a_pass(module(corpus, samples, fields=[]), record={3, 10_000})
    assert loader.dataset.io["samples_decoded"] > 20_000
    reads = {}
    for k in (3, 10_000):
        resumed = module(corpus, samples, fields=[])
        resumed.load_state_dict(states[k])
        keys, _, loader = a_pass(resumed, stop=3)
        assert keys == full[k:k + 3], k                                  # the stream continues
        dataset = loader.dataset
        dropped = dataset.skipped.total - dataset.skipped.carried
        assert dataset.io["samples_read"] == dataset.io["samples_decoded"] == 6 + dropped, (k, dataset.io)
        assert dataset.io["shards_indexed"] <= 4                          # the shards of 1-2 blocks
        reads[k] = dataset.io["samples_decoded"] - dropped
    assert reads[3] == reads[10_000] == 6


def test_another_world_size_keeps_the_samples_consumed_globally(corpus):
    """A 2-rank state (3 batches of 2 per rank: 12 samples) resumed on 1 rank: 6 batches done of
    its 12, rank 0's worker continues its stream, and the pass yields the epoch's other 12 samples."""
    states, passes = [], []
    for rank in range(2):
        dm = module(corpus, 24)
        dm._world = lambda rank=rank: (rank, 2)
        keys, state, _ = a_pass(dm, record={3})
        assert len(keys) == 6
        states.append(state[3])
        passes.append(keys)
    state = {**states[0], "ranks": {0: states[0]["ranks"][0], 1: states[1]["ranks"][1]}}   # what the gather makes
    one = module(corpus, 24)
    point, consumed = resume_point(state, one._dataset("train", 24, True), 0, 1, 0, 2)
    assert consumed == 6 and point.remaining == {0: 12}
    assert point.positions == {0: tuple(state["ranks"][0]["positions"][0])}
    one.load_state_dict(state)
    keys, _, _ = a_pass(one)
    assert len(keys) == 6 and keys[:3] == passes[0][3:]                 # rank 0's stream goes on
