"""The loopback Ray cluster (head 127.0.0.2 + a worker 127.0.0.3, test_ray_cluster's
LoopbackCluster) takes a `ray job submit` of the preprocessing job writing into the S3 bucket
(SeaweedFS on 127.0.0.1). The S3 credentials reach the nodes as a pod gets them from a Secret:
in the environment of `ray start`, never on the command line or in the job's config."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_ray_cluster import BIN, ROOT, LoopbackCluster, _env

sys.path.insert(0, str(Path(__file__).parents[1] / "infra"))
from services_stack import s3_server_fixture  # noqa: E402,F401  (fixture `s3_server`)

from preprocessing import storage  # noqa: E402

pytestmark = [pytest.mark.services, pytest.mark.slow]


@pytest.fixture
def s3_cluster(s3_server, tmp_path, monkeypatch):
    for name, value in s3_server["env"].items():
        monkeypatch.setenv(name, value)          # `ray start` (and so every node) inherits them
    cluster = LoopbackCluster(tmp_path)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def test_job_submit_writes_shards_into_the_bucket(s3_cluster, s3_server, tmp_path, synthetic_model_path):
    from preprocessing.synthetic.world import WorldConfig, generate_corpus

    corpus = generate_corpus(tmp_path / "corpus", WorldConfig(identities=2, clips_per_identity=1, frames=12,
                                                              size=96, seed=7), synthetic_model_path, progress=False)
    rows = [{"path": str(corpus.out / r.video), "identity_id": r.identity_id, "clip_id": r.clip_id}
            for r in pd.read_parquet(corpus.out / "manifest.parquet").itertuples()]
    pd.DataFrame(rows).to_csv(tmp_path / "inputs.csv", index=False)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "head_model": str(synthetic_model_path), "clips_per_shard": 1,
        "stages": {"max_frames": 12, "segment_frames": 12, "min_frames": 8, "fit": {"iters_expression": 40}},
        "workers": {"num_cpus": 1}}))
    out = f"{s3_server['data_bucket']}/ray-cluster/out"
    proc = subprocess.run(
        [str(BIN / "ray"), "job", "submit", f"--address=http://127.0.0.1:{s3_cluster.dashboard}",
         "--working-dir", str(ROOT), "--", "python", "-m", "pipelines.preprocess", "--config", str(config),
         "--input", str(tmp_path / "inputs.csv"), "--output", out, "--no-progress"],
        capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(next(line for line in reversed(proc.stdout.splitlines()) if line.startswith("{")))
    assert result["last_run"]["mode"] == "cluster" and result["complete"] and result["ok"] == 2
    assert result["output"] == out
    assert s3_server["secret"] not in proc.stdout + proc.stderr          # never printed or logged
    names = storage.listdir(f"{out}/shards")
    assert [n for n in names if n.endswith(".tar")] == ["train-000000.tar", "train-000001.tar"]
    fs, path = storage.arrow_filesystem(f"{out}/manifest.parquet")
    manifest = pd.read_parquet(path, filesystem=fs)
    assert set(manifest.status) == {"ok"} and set(manifest.node) <= {"127.0.0.2", "127.0.0.3"}
    from training.data.shards import ShardDataset, shard_urls
    keys = {s.key for s in ShardDataset(shard_urls(out), 4, resampled=False, convert=None, rank=0, world_size=1)}
    assert keys == {"id000_clip00_s000", "id001_clip00_s000"}
