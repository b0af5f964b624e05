"""The latent precompute job from a preprocessing output in the bucket to sidecars in the bucket
(SeaweedFS on 127.0.0.1), resumable there, and the training reader pairing them from S3."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from processes import run_group
from sample_factory import write_random_shards

sys.path.insert(0, str(Path(__file__).parents[1] / "infra"))
from services_stack import s3_server_fixture  # noqa: E402,F401  (fixture `s3_server`)

from preprocessing import storage  # noqa: E402

pytestmark = [pytest.mark.services, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _job(env: dict, *args: str) -> tuple[int, dict]:
    proc = run_group([sys.executable, "-m", "pipelines.encode_latents", "--no-progress", "--workers", "1",
                      "--num-cpus", "1", *args], cwd=ROOT, timeout=600,
                     env={**os.environ, **env, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)})
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-3000:]
    return proc.returncode, json.loads(lines[-1])


@pytest.mark.extended
def test_latents_from_and_into_the_bucket(s3_server, monkeypatch):
    for name, value in s3_server["env"].items():
        monkeypatch.setenv(name, value)
    source = f"{s3_server['data_bucket']}/latents-test/source"
    originals = write_random_shards(source, clips=4, frames=6, size=32)      # the job's writer, into S3
    out = f"{s3_server['data_bucket']}/latents-test/lat"
    code, result = _job(s3_server["env"], "--input", source, "--output", out)
    assert code == 0 and result["written"] == 2 and result["samples"] == 8, result
    assert result["output"] == f"{out}/{result['codec_id']}"
    side = f"{out}/{result['codec_id']}/shards"
    assert storage.listdir(side) == ["train-000000.done.json", "train-000000.tar",
                                     "train-000001.done.json", "train-000001.tar"]
    code, again = _job(s3_server["env"], "--input", source, "--output", out)
    assert code == 0 and again["pending"] == 0 and again["written"] == 0
    from training.data.shards import ShardDataset, shard_urls
    urls = shard_urls(source)
    assert urls == [f"{source}/shards/train-000000.tar", f"{source}/shards/train-000001.tar"]
    ds = ShardDataset(urls, 8, resampled=False, convert=None, rank=0, world_size=1, latents=side)
    assert len(ds.sidecars) == 2
    seen = {sample.key: lat for sample, lat in ds}
    assert set(seen) == set(originals)
    assert all(lat.video.shape == (16, 2, 4, 4) for lat in seen.values())
