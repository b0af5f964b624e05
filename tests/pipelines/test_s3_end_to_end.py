"""Object storage end to end against a real S3 server (SeaweedFS on 127.0.0.1, started and
stopped by pid): the preprocessing job reads its manifest and videos from the bucket and writes
its shards there, is killed (SIGKILL of its process group) mid-run and resumed, ending with every
clip once; a tiny training then streams those shards from the bucket and writes its checkpoints
and export to it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from processes import kill_group, run_group

sys.path.insert(0, str(Path(__file__).parents[1] / "infra"))
from services_stack import s3_server_fixture  # noqa: E402,F401  (fixture `s3_server`)

from preprocessing import storage  # noqa: E402

pytestmark = [pytest.mark.services, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bucket_env(s3_server):
    """The S3 variables in this process too (the test reads the bucket back)."""
    saved = {k: os.environ.get(k) for k in s3_server["env"]}
    os.environ.update(s3_server["env"])
    yield s3_server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def s3_inputs(bucket_env, synthetic_model_path, tmp_path_factory) -> str:
    """A synthetic corpus (3 identities x 2 clips) uploaded to the bucket with a CSV manifest
    whose video paths are relative to it."""
    from preprocessing.synthetic.world import WorldConfig, generate_corpus

    local = tmp_path_factory.mktemp("s3_corpus")
    corpus = generate_corpus(local / "corpus", WorldConfig(identities=3, clips_per_identity=2, frames=12,
                                                           size=96, seed=5), synthetic_model_path, progress=False)
    frame = pd.read_parquet(corpus.out / "manifest.parquet")
    rows = [{"path": r.video, "identity_id": r.identity_id, "clip_id": r.clip_id, "split": "train"}
            for r in frame.itertuples()]
    base = f"{bucket_env['data_bucket']}/e2e/inputs"
    for r in rows:
        storage.put_bytes(f"{base}/{r['path']}", (corpus.out / r["path"]).read_bytes())
    storage.put_bytes(f"{base}/inputs.csv", pd.DataFrame(rows).to_csv(index=False).encode())
    return f"{base}/inputs.csv"


def job_config(tmp: Path, model: Path) -> Path:
    cfg = {"head_model": str(model), "clips_per_shard": 1, "max_failure_ratio": 1.0,
           "stages": {"fps": 25, "max_frames": 12, "segment_frames": 4, "min_frames": 4,
                      "fit": {"iters_expression": 40}, "licence": "test"},
           "workers": {"num_cpus": 1, "max_retries": 1, "clip_retries": 0},
           "ray": {"num_cpus": 1, "object_store_mb": 256}}
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def job_command(config: Path, manifest: str, output: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.preprocess", "--config", str(config), "--input", manifest,
            "--output", output, "--no-progress"]


def job_env(s3_server) -> dict:
    return {**os.environ, **s3_server["env"], "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1"}


def committed(output: str) -> list[str]:
    return [n for n in storage.listdir(f"{output}/shards") if n.endswith(".done.json")]


@pytest.fixture(scope="module")
def killed_and_resumed(bucket_env, s3_inputs, synthetic_model_path, tmp_path_factory):
    """The job into the bucket, SIGKILLed (its whole process group) once a shard is committed,
    then run again to the end."""
    tmp = tmp_path_factory.mktemp("s3_job")
    output = f"{bucket_env['data_bucket']}/e2e/preprocess"
    cmd = job_command(job_config(tmp, synthetic_model_path), s3_inputs, output)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=job_env(bucket_env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not committed(output) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.3)
        kill_group(proc.pid)
        killed_output = proc.communicate(timeout=60)[0].decode(errors="replace")
    finally:
        kill_group(proc.pid)
    before = {n: storage.get_bytes(f"{output}/shards/{n}") for n in committed(output)}
    assert before, f"no shard was committed before the kill: {killed_output[-3000:]}"
    assert len(before) < 6, "the job finished before it could be killed"
    lock_left = storage.exists(f"{output}/.job.lock")
    resumed = run_group(cmd, cwd=ROOT, env=job_env(bucket_env), timeout=600)
    lines = resumed.stdout.strip().splitlines()
    assert resumed.returncode == 0 and lines, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    return output, before, lock_left, json.loads(lines[-1])


def test_killed_job_resumes_to_every_clip_once(killed_and_resumed):
    output, before, lock_left, summary = killed_and_resumed
    assert lock_left                        # the killed job's lease object was left behind ...
    assert not storage.exists(f"{output}/.job.lock")     # ... taken over (its pid is gone) and released
    assert summary["complete"] and summary["inputs"] == 6 and summary["finished"] == 6
    assert summary["output"] == output and "secret" not in json.dumps(summary).lower()
    # shards committed before the kill were trusted, not redone
    assert summary["last_run"]["shards_written"] == 6 - len(before)
    for name, blob in before.items():
        assert storage.get_bytes(f"{output}/shards/{name}") == blob
    markers = [json.loads(storage.get_bytes(f"{output}/shards/{n}")) for n in committed(output)]
    clips = [row["clip_id"] for m in markers for row in m["clips"]]
    assert len(clips) == 6 and len(set(clips)) == 6
    keys = [k for m in markers for k in m["keys"]]
    assert len(keys) == len(set(keys)) == summary["samples"] > 0
    for m in markers:                       # every committed tar is there with its size
        if m["tar"]:
            assert storage.size(f"{output}/shards/{m['tar']}") == m["bytes"]
    fs, path = storage.arrow_filesystem(f"{output}/manifest.parquet")
    manifest = pd.read_parquet(path, filesystem=fs)
    assert sorted(manifest.clip_id) == sorted(clips)
    assert all(p.startswith("s3://") for p in manifest.path)
    assert json.loads(storage.get_bytes(f"{output}/summary.json"))["complete"]


def test_tiny_training_reads_the_bucket_and_checkpoints_to_it(killed_and_resumed, bucket_env, tmp_path):
    output, *_ = killed_and_resumed
    run = f"{bucket_env['data_bucket']}/e2e/run"
    override = {
        "trainer": {"max_steps": 3, "max_epochs": -1, "enable_progress_bar": False, "log_every_n_steps": 1,
                    "check_val_every_n_epoch": 100,
                    "callbacks": [
                        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                         "init_args": {"dirpath": f"{run}/checkpoints", "filename": "step{step:06d}",
                                       "auto_insert_metric_name": False, "every_n_train_steps": 3,
                                       "save_last": True}},
                        {"class_path": "training.callbacks.EMA",
                         "init_args": {"decay": 0.9, "export_dir": f"{run}/export"}}]},
        "model": {"init_args": {"vertex_samples": 256, "warmup_steps": 1}},
        "data": {"init_args": {"root": output, "val_split": None, "batch_size": 2, "samples_per_epoch": 4,
                               "val_samples": 2, "shuffle_buffer": 4}}}
    config = tmp_path / "s3_run.yaml"
    config.write_text(yaml.safe_dump(override))
    proc = run_group([sys.executable, "-m", "training.train", "fit", "--config", "configs/train/transfer_tiny.yaml",
                      "--config", str(config), "--out", str(tmp_path / "run")],
                     cwd=ROOT, env=job_env(bucket_env), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    checkpoints = storage.listdir(f"{run}/checkpoints")
    assert "last.ckpt" in checkpoints and "step000003.ckpt" in checkpoints, checkpoints
    from training.export import load_checkpoint_state
    state = load_checkpoint_state(f"{run}/checkpoints/step000003.ckpt")     # weights_only, from the URL
    assert state["global_step"] == 3
    assert any(n.endswith(".safetensors") for n in storage.walk_files(f"{run}/export"))
    secret = bucket_env["secret"].encode()        # not in the MLflow store, params or artifacts
    assert not any(secret in p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file())
