"""Schema samples with random content (no fitting), for schema, shard and reader tests."""
from __future__ import annotations

import numpy as np

from preprocessing.sample_schema import SMPLX_PER_FRAME, ShardSample, sample_key


def random_sample(clip_id: str = "clip", segment: int = 0, frames: int = 4, size: int = 32,
                  seed: int = 0, depth: bool = True) -> ShardSample:
    rng = np.random.default_rng(seed)
    t, n_face, n = frames, 50, 120
    smplx = {k: rng.standard_normal((t, 3, 3) if k in ("camera_K", "camera_R") else
                                    (t, 100) if k == "expression" else (t, 3)).astype(np.float32)
             for k in SMPLX_PER_FRAME}
    smplx["betas"] = rng.standard_normal(300).astype(np.float32)
    sil = rng.random((t, size, size)) > 0.3
    return ShardSample(
        key=sample_key(clip_id, segment),
        frames=rng.integers(0, 256, (t, size, size, 3), dtype=np.uint8),
        normals=rng.integers(0, 256, (t, size, size, 3), dtype=np.uint8),
        silhouette=sil, face_mask=sil & (rng.random((t, size, size)) > 0.5),
        depth=(rng.random((t, size, size)) * sil).astype(np.float16) if depth else None,
        smplx=smplx,
        dynamic_offsets=(rng.standard_normal((t, n_face, 3)) * 1e-3).astype(np.float16),
        face_vertex_ids=np.sort(rng.choice(n, n_face, replace=False)).astype(np.int32),
        static_offsets=(rng.standard_normal((n, 3)) * 1e-3).astype(np.float16),
        qc={"status": ["ok"] * t, "landmark_error_pct": [1.5] * t},
        meta={"clip_id": clip_id, "identity_id": "idA", "segment": segment, "split": "train"})


def write_random_shards(root, clips: int, clips_per_shard: int = 2, **sample_args) -> dict[str, ShardSample]:
    """A preprocessing output under ``root``: ``clips`` clips of 2 random samples each, cut into
    shards of ``clips_per_shard`` by the job's own plan and writer; returns key -> sample."""
    from preprocessing.shard_format import ShardFolder, plan_shards, write_shard
    from preprocessing.clip_records import ClipItem, ClipOutcome
    from preprocessing.sample_schema import encode_sample

    out = ShardFolder(root)
    out.prepare()
    items = [ClipItem(f"c{i}", f"/v/{i}.mp4", f"id{i}") for i in range(clips)]
    originals = {}
    for spec in plan_shards(items, clips_per_shard, "cfg"):
        outcomes = []
        for item in spec.clips:
            samples = [random_sample(item.clip_id, s, seed=int(item.clip_id[1:]) * 2 + s, **sample_args)
                       for s in range(2)]
            originals.update({s.key: s for s in samples})
            outcomes.append(ClipOutcome(item.clip_id, item.identity_id, "train", item.path, "ok",
                                        samples=[encode_sample(s) for s in samples]))
        write_shard(out, spec, outcomes)
    return originals
