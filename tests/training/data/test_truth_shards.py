"""Exact-truth shards of the synthetic world: the job's layout, the world's Δf, Δg and β."""
import json

import numpy as np

from preprocessing.synthetic.world import load_clip, load_identity, true_dynamic_offsets
from training.data.shards import ShardDataset, shard_urls


def test_truth_shards_hold_the_worlds_exact_offsets(tiny_corpus, truth_shards):
    world = json.loads((tiny_corpus / "world.json").read_text())
    splits = {i: v["split"] for i, v in world["identities"].items()}
    seen = 0
    for split in ("train", "val", "test"):
        urls = shard_urls(truth_shards, split)
        assert urls, split
        for s in ShardDataset(urls, 2 * len(urls), resampled=False, rank=0, world_size=1, convert=None):
            clip, ident = s.meta["clip_id"], s.meta["identity_id"]
            assert splits[ident] == split and s.meta["offsets_source"] == "synthetic_truth"
            seg = slice(s.meta["frame_start"], s.meta["frame_stop"])
            truth = true_dynamic_offsets(tiny_corpus, clip, ident)[seg]
            assert np.allclose(s.dynamic_offsets.astype(np.float32), truth, atol=2e-6, rtol=2e-3)
            identity = load_identity(tiny_corpus, ident)
            assert np.allclose(s.static_offsets.astype(np.float32), identity.static_offsets, atol=2e-6, rtol=2e-3)
            assert np.array_equal(s.smplx["betas"], identity.betas)
            assert np.array_equal(s.smplx["expression"], load_clip(tiny_corpus, clip)["expression"][seg])
            assert s.silhouette.mean() > 0.05 and s.face_mask.any()          # rendered from the true mesh
            seen += 1
    assert seen == 8                                                        # 4 clips x 2 segments
