"""Samples shorter than the training window are dropped by the reader and counted, not raised
inside ``training_step`` (a clip shorter than a segment is written as one short sample)."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from sample_factory import random_sample


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory) -> Path:
    """Two shards by the job's writer: per clip a 9-frame sample and a 4-frame one (32²)."""
    from pipelines.job_io import OutputDir
    from preprocessing.shard_format import plan_shards, write_shard
    from preprocessing.clip_records import ClipItem, ClipOutcome
    from preprocessing.sample_schema import encode_sample
    root = tmp_path_factory.mktemp("mixed")
    out = OutputDir(root)
    out.prepare()
    items = [ClipItem(f"c{i}", f"/v/{i}.mp4", f"id{i}") for i in range(4)]
    for spec in plan_shards(items, 2, "cfg"):
        outcomes = []
        for item in spec.clips:
            k = int(item.clip_id[1:])
            samples = [random_sample(item.clip_id, 0, frames=9, size=32, seed=2 * k),
                       random_sample(item.clip_id, 1, frames=4, size=32, seed=2 * k + 1)]
            outcomes.append(ClipOutcome(item.clip_id, item.identity_id, "train", item.path, "ok",
                                        samples=[encode_sample(s) for s in samples]))
        write_shard(out, spec, outcomes)
    return root


def test_the_reader_drops_and_counts_short_samples(mixed_shards):
    from training.data.shards import ShardDataset, shard_urls
    ds = ShardDataset(shard_urls(mixed_shards, "train"), 4, resampled=False, rank=0, world_size=1,
                      fields=("frames", "normals"), min_frames=9)
    samples = list(ds)
    assert len(samples) == 4 and all(s["frames"].shape[0] == 9 for s in samples)
    assert {s["key"].rsplit("_s", 1)[1] for s in samples} == {"000"}
    # the epoch ends at its 4th sample, before the last clip's short one is read
    assert ds.skipped.counts["ShortSample"] == 3 and ds.skipped.total == 3
    assert "has 4 frames, the window spans 9" in ds.skipped.last
    everything = ShardDataset(shard_urls(mixed_shards, "train"), 8, resampled=False, rank=0, world_size=1,
                              fields=("frames", "normals"))
    assert sorted(s["frames"].shape[0] for s in everything) == [4] * 4 + [9] * 4


def test_training_skips_short_samples_and_logs_the_count(mixed_shards, tmp_path):
    """A real fit whose window (5 frames every 2nd: 9) is longer than half the samples: it
    trains on the long ones and logs how many short ones the reader dropped."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from training.data.datamodule import ShardDataModule
    from training.tasks.generator import GeneratorTask
    task = GeneratorTask(frames=5, frame_stride=2, warmup_steps=1)
    assert task.window_span == 9
    dm = ShardDataModule(str(mixed_shards), val_split=None, batch_size=2, samples_per_epoch=4,
                         shuffle_buffer=0, fields=["frames", "normals"])
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=CSVLogger(tmp_path), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(task, dm)
    assert trainer.global_step == 2
    assert trainer.callback_metrics["data/reader_skipped"] >= 2
    assert dm.window_span() == 9
