"""benchmarks/generator.py's bookkeeping of the cross pairs: motion ratios over the pairs fitted
on both sides, fitted clips kept without pickle."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks.generator import motion_ratio, motion_summary, read_fitted, write_fitted

NAN = float("nan")


def test_motion_ratio_compares_only_pairs_fitted_on_both_sides():
    motion = {"model_vs_driver": {"a|b": {"aed": 0.2, "apd_deg": 4.0}, "c|d": {"aed": NAN, "apd_deg": NAN},
                                  "e|f": {"aed": 0.4, "apd_deg": 8.0}},
              "copy_vs_driver": {"a|b": {"aed": 0.4, "apd_deg": 10.0}, "c|d": {"aed": 0.1, "apd_deg": 1.0},
                                 "e|f": {"aed": 0.4, "apd_deg": 10.0}}}
    assert motion_ratio(motion, "model", "copy", "driver", "apd_deg") == 0.6      # (4 + 8) / (10 + 10)
    assert motion_ratio(motion, "model", "copy", "driver", "aed") == 0.75
    assert motion_ratio(motion, "model", "copy", "truth", "aed") is None          # nothing measured
    summary = motion_summary(motion)
    assert summary["model_vs_driver"]["pairs_fitted"] == 2 and summary["copy_vs_driver"]["pairs_fitted"] == 3
    assert math.isclose(summary["model_vs_driver"]["apd_deg"], 6.0)
    assert motion_summary({"model_vs_truth": {"a|b": {"aed": NAN, "apd_deg": NAN}}})["model_vs_truth"] == \
        {"aed": None, "apd_deg": None, "apd_motion_deg": None, "pairs_fitted": 0}   # strict JSON


def test_fitted_clip_round_trip(tmp_path):
    from preprocessing.fitted_clip import FittedClip
    rng = np.random.default_rng(0)
    clip = FittedClip({"expression": rng.normal(size=(3, 10)).astype(np.float32),
                       "camera_K": rng.normal(size=(3, 3, 3)).astype(np.float32)},
                      rng.normal(size=300).astype(np.float32), rng.normal(size=(7, 3)).astype(np.float32), 32,
                      "clip.mp4#4", rng.normal(size=(3, 5, 3)).astype(np.float32))
    write_fitted(clip, tmp_path / "fit.npz")
    back = read_fitted(tmp_path / "fit.npz")
    assert back.image_size == 32 and back.source == "clip.mp4#4" and back.arrays.keys() == clip.arrays.keys()
    for k in clip.arrays:
        assert np.array_equal(back.arrays[k], clip.arrays[k])
    for k in ("betas", "static_offsets", "dynamic_offsets"):
        assert np.array_equal(getattr(back, k), getattr(clip, k))


def test_exact_motion_of_a_cross_pair_from_the_world(tiny_corpus, synthetic_model_path):
    """The cross truth's exact expression is the driver's (AED 0), its motion since frame 0 is the
    driver's up to the retargeting's composition with the camera, and the still reference's APD
    motion is the driver's own motion."""
    import json

    import pandas as pd

    from benchmarks.generator import cross_windows, exact_motion_errors, pair_videos
    from preprocessing.synthetic.world import SyntheticWorld

    meta = json.loads((tiny_corpus / "world.json").read_text())
    world = SyntheticWorld(synthetic_model_path, meta["config"]["subdivision"])
    clips = pd.read_parquet(tiny_corpus / "manifest.parquet")["clip_id"].tolist()
    source, driver = clips[0], clips[1]
    rng = torch.Generator().manual_seed(0)
    samples = {c: {"identity": c.split("_")[0], "frames": torch.randint(0, 255, (8, 16, 16, 3), generator=rng,
                                                                       dtype=torch.uint8),
                   "normals": torch.randint(0, 255, (8, 16, 16, 3), generator=rng, dtype=torch.uint8)}
               for c in (source, driver)}
    windows = cross_windows(world, tiny_corpus, [(source, driver)], samples, [0], 3, 2, 16)
    assert len(windows) == 1 and windows[0]["frames"] == [2, 4]
    videos = pair_videos(windows, torch.stack([w["video"] for w in windows]))
    assert videos[(source, driver)].shape == (3, 16, 16, 3)          # the reference, then frames 2 and 4
    exact = exact_motion_errors(tiny_corpus, windows)
    truth, copy = exact["truth_vs_driver"][f"{source}|{driver}"], exact["copy_vs_driver"][f"{source}|{driver}"]
    assert truth["aed"] == pytest.approx(0, abs=1e-6)
    assert truth["apd_motion_deg"] < 0.5 * copy["apd_motion_deg"]
    assert copy["apd_motion_deg"] > 0 and copy["aed"] > 0


@pytest.mark.extended          # the benchmark's path (24 s); write_truth_shards(fitted=) itself is tested in CI
def test_fitted_shards_carry_the_fitters_head_of_each_train_and_val_clip(tiny_corpus, synthetic_model_path,
                                                                         tmp_path):
    """``--train-normals fitted``: each train/val clip rendered at the fit size and fitted whole on
    the job's path (the fits kept in ``fit_cache``), its samples carrying that fit in the clip's
    own frames; no test clip is read."""
    import argparse
    import json
    import shutil

    from benchmarks.generator import from_recipe, job_stages, make_fitted_shards
    from preprocessing.synthetic.world import SyntheticWorld
    from training.data.shards import ShardDataset, shard_urls

    work = tmp_path / "work"
    shutil.copytree(tiny_corpus, work / "corpus")
    meta = json.loads((tiny_corpus / "world.json").read_text())
    args = argparse.Namespace(recipe="tiny_cpu", window=None, stride=None, flavor=None, size=64, codec_kind=None,
                              codec_dir=None, fit_size=128, frames=8, reuse=True)
    from_recipe(args)
    out = make_fitted_shards(work, work / "corpus", SyntheticWorld(synthetic_model_path, meta["config"]["subdivision"]),
                             job_stages(args, work / "corpus"), args)
    assert not shard_urls(out, "test")
    splits = {i: v["split"] for i, v in meta["identities"].items()}
    seen = set()
    for split in ("train", "val"):
        for s in ShardDataset(shard_urls(out, split), 2, resampled=False, rank=0, world_size=1, convert=None):
            assert s.meta["normals"] == "fitted" and splits[s.meta["identity_id"]] == split
            fit = read_fitted(work / "fit_cache" / f"{s.meta['clip_id']}_128.mp4_64.npz")
            assert fit.image_size == 64 and np.array_equal(s.smplx["expression"], fit.arrays["expression"])
            assert s.silhouette.mean() > 0.05                                 # the fitted head is in the frame
            seen.add(s.meta["clip_id"])
    assert len(seen) == 3                                                     # 2 train + 1 val clips
