"""The preprocessing job end to end (embedded Ray): synthetic corpus + real clips + bad inputs.

One module-scoped run is checked from several sides; a second run with a worker killed and a
stage crashing once must give the identical shard set; a rerun must write nothing.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from processes import run_group

from preprocessing.files import file_digest
from preprocessing.sample_schema import encode_sample
from training.data.shards import ShardDataset, shard_urls

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]

BAD = {"zero_byte": "not_a_video", "text": "not_a_video", "audio_only": "no_video_stream",
       "no_frames": "zero_duration", "single_frame": "too_few_frames", "good": "no_face"}


def job_config(tmp: Path, model: Path, **extra) -> Path:
    cfg = {
        "head_model": str(model), "clips_per_shard": 3, "max_failure_ratio": 0.75,
        "stages": {"fps": 25, "max_frames": 16, "segment_frames": 8,
                   "min_frames": 8, "fit": {"iters_expression": 100}, "licence": "test"},
        "workers": {"num_cpus": 1, "max_retries": 3, "clip_retries": 1},
        "ray": {"num_cpus": 2, "object_store_mb": 512},
        **extra,
    }
    path = tmp / f"job-{len(list(tmp.glob('job-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_job(config: Path, inputs: Path, output: Path, *args: str, faults: dict | None = None) -> tuple[int, dict]:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
    if faults:
        env["EXPPORTRAIT_TEST_FAULTS"] = json.dumps(faults)     # the test hook (never in a config)
    proc = run_group([sys.executable, "-m", "pipelines.preprocess", "--config", str(config),
                      "--input", str(inputs), "--output", str(output), "--no-progress", *args],
                     cwd=ROOT, env=env, timeout=900)      # its embedded Ray is stopped by process group
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-3000:]
    try:
        return proc.returncode, json.loads(lines[-1])
    except json.JSONDecodeError:
        raise AssertionError(proc.stdout[-2000:] + proc.stderr[-3000:])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, synthetic_model_path, video_fixtures, carphone, single_face_video):
    from preprocessing.synthetic.world import WorldConfig, generate_corpus

    root = tmp_path_factory.mktemp("job_inputs")
    corpus = generate_corpus(root / "corpus", WorldConfig(identities=2, clips_per_identity=2, frames=16,
                                                          size=128, seed=3), synthetic_model_path,
                             progress=False)
    rows = [{"path": str(corpus.out / r.video), "identity_id": r.identity_id, "clip_id": r.clip_id,
             "split": r.split} for r in pd.read_parquet(corpus.out / "manifest.parquet").itertuples()]
    rows += [{"path": str(carphone), "identity_id": "carphone", "clip_id": "real_carphone", "split": "train"},
             {"path": str(single_face_video), "identity_id": "feat", "clip_id": "real_single_face",
              "split": "train"}]
    rows += [{"path": str(video_fixtures[k]), "identity_id": f"bad_{k}", "clip_id": f"bad_{k}",
              "split": "train"} for k in list(BAD) + ["truncated"]]
    manifest = root / "inputs.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return root, manifest, rows


@pytest.fixture(scope="module")
def synthetic_only(inputs) -> Path:
    """The synthetic clips alone (2 identities x 2 clips): what the fault tests run on."""
    root, _, rows = inputs
    path = root / "synthetic.csv"
    pd.DataFrame([r for r in rows if r["clip_id"].startswith("id0")]).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def first_run(inputs, synthetic_model_path, tmp_path_factory):
    root, manifest, _ = inputs
    out = tmp_path_factory.mktemp("job_a")
    code, result = run_job(job_config(root, synthetic_model_path), manifest, out)
    assert code == 0, result
    return out, result


def _tree(out: Path) -> dict:
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino)
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != "summary.json"}


def _hashes(out: Path) -> dict:
    return {p.name: file_digest(p, "sha256") for p in sorted((out / "shards").glob("*.tar"))}


def test_every_input_has_a_row_and_good_clips_are_in_shards(inputs, first_run):
    _, _, rows = inputs
    out, result = first_run
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert sorted(manifest.clip_id) == sorted(r["clip_id"] for r in rows)
    status = dict(zip(manifest.clip_id, manifest.status))
    for k, expected in BAD.items():
        assert status[f"bad_{k}"] == expected, manifest.set_index("clip_id").loc[f"bad_{k}", "reason"]
    assert status["bad_truncated"] != "ok"
    good = [r["clip_id"] for r in rows if not r["clip_id"].startswith("bad_")]
    assert all(status[c] == "ok" for c in good), manifest[["clip_id", "status", "reason"]]
    errors = pd.read_parquet(out / "errors.parquet")
    assert sorted(errors.clip_id) == sorted(c for c, s in status.items() if s != "ok")
    assert all(errors.reason.str.len() > 0)
    # every ok clip's samples (16 frames / 8 per segment) are in the shard its row names
    keys = {}
    for m in (out / "shards").glob("*.done.json"):
        marker = json.loads(m.read_text())
        keys.update({k: marker["tar"] for k in marker["keys"]})
    for r in manifest[manifest.status == "ok"].itertuples():
        assert r.samples == 2
        assert keys[f"{r.clip_id}_s000"] == keys[f"{r.clip_id}_s001"] == r.shard
    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs"] == len(rows) and summary["samples"] == 2 * len(good)
    assert summary["stages"]["crop_size"] > 0 and "fov_deg" in summary["stages"]   # what inference repeats
    assert summary["landmark_embedding"] not in ("", "none")       # the synthetic model's calibrated file (auto)
    assert result["last_run"]["mode"] == "embedded"
    assert all(n.startswith("127.") for n in result["last_run"]["nodes"]), result["last_run"]
    assert not list(out.rglob("*.tmp-*"))


def test_summary_records_the_whole_stage_spec(first_run):
    """The job writes its resolved stage spec (what ``register`` packs and inference rebuilds its
    stages from): the stage config with its defaults, the fitter's whole settings, the landmark
    embedding it used with its weights."""
    from preprocessing.clip_stages import STAGE_SPEC_FORMAT, read_stage_spec
    from preprocessing.fitting import FitConfig
    out, _ = first_run
    summary = json.loads((out / "summary.json").read_text())
    spec = summary["stage_spec"]
    assert spec["format"] == STAGE_SPEC_FORMAT and spec["stages"] == summary["stages"]
    assert spec["stages"]["fps"] == 25 and spec["stages"]["max_side"] == 720      # a default, resolved
    assert spec["fit"]["iters_expression"] == 100 and spec["fit"]["w_landmarks"] == FitConfig().w_landmarks
    assert spec["fit"]["fov_deg"] == spec["stages"]["fov_deg"] and spec["subdivision"] == 1
    assert spec["fit_threads"] == 1                 # the workers' torch threads (workers.num_cpus: 1)
    emb = spec["landmark_embedding"]
    assert emb["digest"] == summary["landmark_embedding"] and emb["file"].endswith(".npz") and len(emb["weights"]) == 68
    config, fit, embedding = read_stage_spec(spec)
    assert config.model_dump(mode="json") == spec["stages"] and fit.iters_expression == 100
    np.testing.assert_allclose(embedding.weights(), emb["weights"], atol=1e-6)


def test_shards_round_trip_and_identity_is_shared(first_run):
    out, _ = first_run
    urls = shard_urls(out, "train")
    samples = list(ShardDataset(urls, 100, resampled=False, convert=None, rank=0, world_size=1))
    unique = {s.key: s for s in samples}
    assert len(unique) == json.loads((out / "summary.json").read_text())["samples"]
    import webdataset as wds
    raw = {s["__key__"]: s for u in urls for s in wds.WebDataset(u, shardshuffle=False)}
    for key, sample in unique.items():
        again = encode_sample(sample, sample.meta["frame_codec"], fps=sample.meta["fps"])
        assert all(again[m] == raw[key][m] for m in again if m != "__key__"), key   # bit-exact
        assert sample.frames.shape == (8, 256, 256, 3) and sample.normals.shape == sample.frames.shape
        assert sample.silhouette.any() and (sample.normals[~sample.silhouette] == 0).all()
        assert sample.meta["licence"] == "test" and len(sample.meta["head_model_sha1"]) == 40
    # β and Δg are the identity's: the same in every sample, equal to the saved identity
    for identity in ("id000", "id001"):
        with np.load(out / "identities" / f"{identity}.npz") as z:
            betas = z["betas"]
        of_id = [s for s in unique.values() if s.meta["identity_id"] == identity]
        assert len(of_id) == 4
        assert all(np.array_equal(s.smplx["betas"], betas) for s in of_id)


def test_rerun_writes_nothing_new_and_threshold_fails_the_job(inputs, first_run, synthetic_model_path):
    root, manifest, _ = inputs
    out, _ = first_run
    before = _tree(out)
    code, result = run_job(job_config(root, synthetic_model_path), manifest, out)
    assert code == 0 and result["last_run"]["clips_processed"] == 0
    assert result["last_run"]["shards_written"] == 0
    assert _tree(out) == before
    strict = job_config(root, synthetic_model_path, max_failure_ratio=0.2)
    code, result = run_job(strict, manifest, out)
    assert code == 1 and "failure ratio" in result["error"]
    code, result = run_job(strict, manifest, out, "--dry-run")
    assert code == 0 and result["pending_clips"] == 0


@pytest.mark.extended
def test_locked_output_and_retry_failed(inputs, first_run, synthetic_model_path, tmp_path):
    """A second job on a busy output stops with exit 2; ``--retry-failed`` redoes exactly the
    shard whose clip was lost, and gives the shard a clean run gave."""
    import shutil

    from pipelines.job_io import OutputDir

    root, manifest, _ = inputs
    out_a, _ = first_run
    out = tmp_path / "copy"
    shutil.copytree(out_a, out)
    with OutputDir(out).locked():
        code, result = run_job(job_config(root, synthetic_model_path), manifest, out)
    assert code == 2 and result["error"] == "OutputBusy"
    # a worker lost on every retry left a row and no samples; the rerun keeps it as it is
    marker_path, marker, lost = next((p, m, r) for p in sorted((out / "shards").glob("*.done.json"))
                                     for m in [json.loads(p.read_text())] for r in m["clips"]
                                     if r["status"] == "ok")
    lost.update(status="worker_lost", stage="worker", reason="test", samples=0)
    marker_path.write_text(json.dumps(marker))
    code, result = run_job(job_config(root, synthetic_model_path), manifest, out)
    assert code == 0 and result["last_run"]["shards_written"] == 0
    manifest_rows = pd.read_parquet(out / "manifest.parquet").set_index("clip_id")
    assert manifest_rows.loc[lost["clip_id"], "status"] == "worker_lost"
    code, result = run_job(job_config(root, synthetic_model_path), manifest, out, "--retry-failed")
    assert code == 0 and result["last_run"]["shards_written"] == 1
    assert pd.read_parquet(out / "manifest.parquet").set_index("clip_id").loc[lost["clip_id"], "status"] == "ok"
    assert _hashes(out) == _hashes(out_a)


def test_killed_worker_and_crashing_stage_give_the_identical_shard_set(inputs, first_run,
                                                                       synthetic_model_path, tmp_path):
    root, manifest, _ = inputs
    out_a, _ = first_run
    out = tmp_path / "job_b"
    faults = {"kill_worker": ["id000_clip01"], "transient_error": ["id001_clip00"]}
    code, result = run_job(job_config(root, synthetic_model_path), manifest, out, faults=faults)
    assert code == 0, result
    assert (out / "_faults" / "kill_worker-id000_clip01").is_file()      # the kill did happen
    rows = pd.read_parquet(out / "manifest.parquet").set_index("clip_id")
    assert rows.loc["id001_clip00", "attempts"] == 2                     # transient: retried in place
    assert rows.loc["id000_clip01", "status"] == "ok" and rows.loc["id000_clip01", "attempts"] == 2
    assert _hashes(out) == _hashes(out_a)
    assert not list(out.rglob("*.tmp-*"))
    # a run killed mid-shard: half-written temp file, shard without its marker
    victim = sorted((out / "shards").glob("*.done.json"))[0]
    victim.unlink()
    (out / "shards" / f".{victim.name[:-10]}.tar.tmp-0badc0de").write_bytes(b"half a tar")
    untouched = {k: v for k, v in _tree(out).items()               # other shards, identities
                 if victim.name[:-10] not in k and not k.endswith(".parquet")}
    code, result = run_job(job_config(root, synthetic_model_path), manifest, out)
    assert code == 0 and result["last_run"]["shards_written"] == 1
    assert not list(out.rglob("*.tmp-*"))
    assert _hashes(out) == _hashes(out_a)
    assert {k: v for k, v in _tree(out).items() if k in untouched} == untouched


@pytest.mark.extended
def test_stage_errors_are_not_retried_and_dead_workers_are_lost(inputs, synthetic_only, synthetic_model_path,
                                                               tmp_path):
    """A deterministic error in a stage is a ``stage_error`` row at once (type and clean
    message, one attempt); a clip that kills its worker every time runs 1 + max_retries times
    and is ``worker_lost``; the other clips are unaffected."""
    root, _, _ = inputs
    faults = {"stage_error": ["id000_clip01"], "kill_worker_always": ["id001_clip01"]}
    config = job_config(root, synthetic_model_path, clips_per_shard=2,
                        workers={"num_cpus": 1, "max_retries": 1, "clip_retries": 2})
    code, result = run_job(config, synthetic_only, tmp_path / "out", faults=faults)
    assert code == 0 and result["statuses"] == {"ok": 2, "stage_error": 1, "worker_lost": 1}, result
    rows = pd.read_parquet(tmp_path / "out" / "manifest.parquet").set_index("clip_id")
    err = rows.loc["id000_clip01"]
    assert (err.status, err.attempts, err.error_type) == ("stage_error", 1, "ValueError")
    assert err.reason == "ValueError: injected deterministic error"
    lost = rows.loc["id001_clip01"]
    assert lost.status == "worker_lost" and lost.attempts == 2 and lost.error_type.startswith("Actor")
    assert "\x1b" not in lost.reason and "\n" not in lost.reason
    assert (rows.loc[["id000_clip00", "id001_clip00"], "status"] == "ok").all()


@pytest.mark.extended
def test_a_full_disk_stops_the_job_and_keeps_what_finished(inputs, synthetic_only, synthetic_model_path,
                                                           tmp_path):
    """A writer that hits ENOSPC: exit 3, the one-line JSON says so, the manifest and summary
    hold the shards that finished before it."""
    root, _, _ = inputs
    out = tmp_path / "out"
    # one shard open at a time: the shards before the last are written before it fails
    config = job_config(root, synthetic_model_path, clips_per_shard=1,
                        workers={"num_cpus": 1, "max_pending_shards": 1})
    code, plan = run_job(config, synthetic_only, out, "--dry-run")
    names = [s["shard"] for s in plan["plan_head"]]
    assert code == 0 and len(names) == 4
    code, result = run_job(config, synthetic_only, out, faults={"writer_enospc": [names[-1]]})
    assert code == 3 and result["exit_code"] == 3 and result["error"] == "EnvironmentFault", result
    assert "No space left on device" in result["message"] and result["complete"] is False
    manifest = pd.read_parquet(out / "manifest.parquet")
    markers = sorted(p.name[:-len(".done.json")] for p in (out / "shards").glob("*.done.json"))
    assert markers == sorted(names[:-1])
    assert len(manifest) == 3 == result["finished"] and (manifest.status == "ok").all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fault"]["error"] == "EnvironmentFault" and summary["unfinished_shards"] >= 1
    # the next run (disk freed) finishes the job and gives the same shards as a clean run
    code, result = run_job(config, synthetic_only, out)
    assert code == 0 and result["complete"] is True and result["last_run"]["shards_written"] >= 1


@pytest.fixture()
def small_tmpfs(tmp_path):
    """A 256 KiB tmpfs (real ENOSPC), remountable read-only; needs root (CI runs as root)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.extended
def test_read_only_and_full_output_are_environment_faults(inputs, synthetic_only, synthetic_model_path,
                                                          small_tmpfs):
    root, _, _ = inputs
    config = job_config(root, synthetic_model_path, clips_per_shard=2)
    # full: the job starts, the first identity's Δg (~0.5 MB) does not fit
    code, result = run_job(config, synthetic_only, small_tmpfs / "out")
    assert code == 3 and result["error"] == "EnvironmentFault", result
    assert "No space left on device" in result["message"]
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    code, result = run_job(config, synthetic_only, small_tmpfs / "other")
    assert code == 3 and result["error"] == "EnvironmentFault" and "Read-only file system" in result["message"]


def test_an_unreachable_cluster_is_an_environment_fault(inputs, synthetic_only, synthetic_model_path):
    import socket

    root, _, _ = inputs
    with socket.socket() as s:                      # a loopback port nothing listens on
        s.bind(("127.0.0.2", 0))
        port = s.getsockname()[1]
    code, result = run_job(job_config(root, synthetic_model_path), synthetic_only, root / "unreached",
                           "--address", f"127.0.0.2:{port}")
    assert code == 3 and result["error"] == "EnvironmentFault" and "cannot reach" in result["message"]
