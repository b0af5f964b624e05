"""`expportrait preflight`: shards like the demo's (the tiny_cpu recipe's preprocessing: 24-frame
samples of 128² crops at 25 fps, the synthetic head) fit tiny_cpu and not wan1.3b, whose
mismatches are named one a line before the JSON error line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from expportrait.cli import main
from sample_factory import random_sample


@pytest.fixture(scope="module")
def demo_like_shards(tmp_path_factory, synthetic_model_path) -> Path:
    """A preprocessing output written by the job's own writer, with the meta the job stamps."""
    from pipelines.job_io import OutputDir
    from preprocessing.shard_format import plan_shards, write_shard
    from preprocessing.clip_records import ClipItem, ClipOutcome
    from preprocessing.files import file_digest
    from preprocessing.sample_schema import encode_sample
    root = tmp_path_factory.mktemp("preprocess")
    out = OutputDir(root)
    out.prepare()
    sha1 = file_digest(synthetic_model_path)
    items = [ClipItem(f"c{i}", f"/v/{i}.mp4", f"id{i}") for i in range(2)]
    for spec in plan_shards(items, 1, "cfg"):
        outcomes = []
        for item in spec.clips:
            samples = []
            for seg in range(2):
                s = random_sample(item.clip_id, seg, frames=24, size=128, seed=seg, depth=False)
                s.meta.update(fps=25.0, crop_size=128, head_model_sha1=sha1)
                samples.append(encode_sample(s))
            outcomes.append(ClipOutcome(item.clip_id, item.identity_id, "train", item.path, "ok", samples=samples))
        write_shard(out, spec, outcomes)
    (root / "summary.json").write_text(json.dumps({"head_model": str(synthetic_model_path),
                                                   "stages": {"crop_size": 128, "fps": 25.0}}))
    return root


def _run(capsys, *args) -> tuple[int, list[str]]:
    rc = main(["preflight", *map(str, args)])
    return rc, capsys.readouterr().out.strip().splitlines()


def test_tiny_cpu_fits_the_demo_like_shards(demo_like_shards, capsys):
    rc, lines = _run(capsys, "--recipe", "tiny_cpu", "--data", demo_like_shards)
    assert rc == 0, lines
    summary = json.loads(lines[-1])
    assert len(lines) == 1 and summary["fits"] is True
    assert (summary["samples"], summary["frames"], summary["window_span"], summary["crop_size"]) == \
        (4, {"min": 24, "max": 24}, 17, 128)


def test_wan13b_names_the_frame_count_and_the_crop_size(demo_like_shards, capsys):
    rc, lines = _run(capsys, "--recipe", "wan1.3b", "--data", demo_like_shards)
    assert rc == 2
    error = json.loads(lines[-1])
    assert error["error"] == "PreflightMismatch" and "frames" in error["message"] and "crop size" in error["message"]
    frames = next(line for line in lines if line.startswith("frames:"))
    assert "4 of 4 samples" in frames and "(33 = (33 - 1) x 1 + 1)" in frames and "4 with 24" in frames
    crop = next(line for line in lines if line.startswith("crop size:"))
    assert "crops 512x512" in crop and "4 at 128x128" in crop
    assert all(not line.startswith("{") for line in lines[:-1])         # one plain line per mismatch


def test_another_head_model_and_a_missing_folder_are_named(demo_like_shards, capsys, tmp_path):
    other = tmp_path / "other.npz"
    other.write_bytes(b"not the model the shards were made with")
    rc, lines = _run(capsys, "--recipe", "tiny_cpu", "--data", demo_like_shards, "--head-model", other)
    assert rc == 2 and any(line.startswith(f"head model: {other} has sha1") for line in lines)
    rc, lines = _run(capsys, "--recipe", "tiny_cpu", "--data", tmp_path / "absent")
    assert rc == 2 and json.loads(lines[-1])["error"] == "FileNotFoundError" and "absent" in lines[-1]
    rc, lines = _run(capsys, "--recipe", "nope", "--data", demo_like_shards)
    assert rc == 2 and "unknown recipe 'nope'" in json.loads(lines[-1])["message"]


def test_driving_normal_sidecars_are_checked_and_their_source_named(demo_like_shards, capsys, tmp_path):
    """Without sidecars the summary says where the driving normals come from; a sidecar folder
    missing a shard, or holding two render ids, is named."""
    rc, lines = _run(capsys, "--recipe", "tiny_cpu", "--data", demo_like_shards)
    assert rc == 0 and json.loads(lines[-1])["driving_normals"] in ("the shards' own", "rendered in the step")
    side = tmp_path / "nrm"
    side.mkdir()
    markers = sorted((demo_like_shards / "shards").glob("*.done.json"))
    for k, marker in enumerate(markers[:1]):             # the first shard only
        sha = json.loads(marker.read_text())["sha256"]
        name = marker.name.replace(".done.json", "")
        (side / f"{name}.tar").write_bytes(b"")
        (side / marker.name).write_text(json.dumps({"source_sha256": sha, "render_id": f"r{k}"}))
    rc, lines = _run(capsys, "--recipe", "tiny_cpu", "--data", demo_like_shards, "--normals", side)
    assert rc == 2 and any(line.startswith(f"normals: 1 of {len(markers)} shards have no sidecar") for line in lines)
    name = markers[1].name.replace(".done.json", "")
    (side / f"{name}.tar").write_bytes(b"")
    (side / markers[1].name).write_text(json.dumps({"source_sha256": json.loads(markers[1].read_text())["sha256"],
                                                    "render_id": "r1"}))
    rc, lines = _run(capsys, "--recipe", "tiny_cpu", "--data", demo_like_shards, "--normals", side)
    assert rc == 2 and any(line.startswith("normals: sidecars of 2 render ids") for line in lines), lines
    (side / markers[1].name).write_text(json.dumps({"source_sha256": json.loads(markers[1].read_text())["sha256"],
                                                    "render_id": "r0"}))
    rc, lines = _run(capsys, "--recipe", "tiny_cpu", "--data", demo_like_shards, "--normals", side)
    summary = json.loads(lines[-1])
    assert rc == 0 and summary["driving_normals"] == "sidecar" and summary["normals_render_id"] == "r0"
