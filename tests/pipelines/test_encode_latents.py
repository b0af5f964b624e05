"""Latent precomputation (embedded Ray): sidecar shards in step with their source shards, the
same latents as encoding in-process, resumable, and read back by the training reader."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from processes import run_group
from sample_factory import write_random_shards

from preprocessing.latent_schema import latent_frames
from training.data.shards import ShardDataset, make_loader, shard_urls

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _job(*args: str) -> tuple[int, dict]:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
    proc = run_group([sys.executable, "-m", "pipelines.encode_latents", "--no-progress", "--workers", "1",
                      "--num-cpus", "1", *args], cwd=ROOT, env=env, timeout=600)   # Ray stopped by group
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-3000:]
    return proc.returncode, json.loads(lines[-1])


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """2 shards: 2 clips x 2 samples of 6 frames at 32^2 (5 = 4k+1 are encoded)."""
    root = tmp_path_factory.mktemp("source")
    originals = write_random_shards(root, clips=4, frames=6, size=32)
    return root, {k: s.frames for k, s in originals.items()}


def test_sidecars_match_in_process_encoding_and_resume(shards, tmp_path):
    from models.generator import LatentCodec, to_unit_video

    root, frames = shards
    code, result = _job("--input", str(root), "--output", str(tmp_path / "lat"))
    assert code == 0 and result["written"] == 2 and result["samples"] == 8, result
    side = tmp_path / "lat" / result["codec_id"] / "shards"
    codec = LatentCodec.tiny(seed=0).eval()
    ds = ShardDataset(shard_urls(root), 8, resampled=False, convert=None, rank=0, world_size=1, latents=side)
    assert len(ds.sidecars) == 2
    seen = {}
    for sample, lat in ds:
        seen[sample.key] = lat
        video = to_unit_video(torch.from_numpy(frames[sample.key][None, :latent_frames(6)]))
        with torch.no_grad():
            expect = codec.encode(video)[0].numpy()
        assert lat.video.shape == (16, 2, 4, 4) and lat.video.dtype == np.float16
        assert np.allclose(lat.video.astype(np.float32), expect, atol=2e-3), sample.key
        assert lat.meta["codec_id"] == result["codec_id"] and lat.meta["frames"] == 5
    assert set(seen) == set(frames)
    # a rerun writes nothing; the loader carries the latents as tensors
    code, again = _job("--input", str(root), "--output", str(tmp_path / "lat"))
    assert code == 0 and again["pending"] == 0 and again["written"] == 0
    batch = next(iter(make_loader(root, 4, 2, num_workers=0, split=None, resampled=False, latents=side)))
    assert batch["latents"].shape == (2, 16, 2, 4, 4) and batch["reference_latent"].shape == (2, 16, 2, 4, 4)
    # a sidecar made from other bytes of its shard is not used (that shard is encoded on the fly)
    marker = side / "train-000000.done.json"
    stale = json.loads(marker.read_text())
    stale["source_sha256"] = "0" * 64
    marker.write_text(json.dumps(stale))
    partial = ShardDataset(shard_urls(root), 8, resampled=False, rank=0, world_size=1, latents=side)
    assert len(partial.sidecars) == 1
    code, redo = _job("--input", str(root), "--output", str(tmp_path / "lat"))
    assert code == 0 and redo["pending"] == 1 and redo["written"] == 1


def test_bad_inputs_are_exit_2(shards, tmp_path):
    root, _ = shards
    code, result = _job("--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "lat"))
    assert code == 2 and "not a preprocessing output" in result["message"]
    (tmp_path / "empty" / "shards").mkdir(parents=True)
    code, result = _job("--input", str(tmp_path / "empty"), "--output", str(tmp_path / "lat"))
    assert code == 2 and "no finished shard" in result["message"]
    code, result = _job("--input", str(root), "--output", str(tmp_path / "lat"), "--codec", str(tmp_path / "no_vae"))
    assert code == 2 and "does not exist" in result["message"]
    (tmp_path / "vae").mkdir()
    code, result = _job("--input", str(root), "--output", str(tmp_path / "lat"), "--codec", str(tmp_path / "vae"))
    assert code == 2 and result["message"].startswith("codec:") and "vae" in result["message"], result
