"""Inputs, shard plan and shard writing of the preprocessing job (no Ray)."""
import json
from pathlib import Path

import pandas as pd
import pytest
from sample_factory import random_sample

from pipelines.job_io import JobInputError, OutputBusy, OutputDir, list_inputs, manifest_frame, retryable_clips
from preprocessing.shard_format import plan_shards, write_shard
from preprocessing.files import file_digest
from preprocessing.clip_stages import ClipItem, ClipOutcome
from preprocessing.sample_schema import encode_sample


def test_folder_inputs_identity_from_subfolder_and_deterministic_limit(tmp_path):
    for rel in ("alice/b.mp4", "alice/a.MOV", "bob/x.mkv", "solo.mp4", "notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    items = list_inputs(tmp_path)
    assert [(i.clip_id, i.identity_id) for i in items] == [
        ("alice_a", "alice"), ("alice_b", "alice"), ("bob_x", "bob"), ("solo", "solo")]
    assert list_inputs(tmp_path, limit=2) == items[:2]


def test_manifest_inputs_csv_and_parquet(tmp_path):
    df = pd.DataFrame({"video": ["v/1.mp4", "/abs/2.mp4"], "identity": ["p1", "p2"],
                       "split": ["val", ""]})
    df.to_csv(tmp_path / "m.csv", index=False)
    items = list_inputs(tmp_path / "m.csv")
    assert items[0].path == "/abs/2.mp4" and items[0].split == "train"
    assert items[1].path == str((tmp_path / "v/1.mp4").resolve()) and items[1].split == "val"
    df.rename(columns={"video": "path", "identity": "identity_id"}).to_parquet(tmp_path / "m.parquet")
    assert [i.clip_id for i in list_inputs(tmp_path / "m.parquet")] == [i.clip_id for i in items]


def test_bad_inputs_are_clear(tmp_path):
    with pytest.raises(JobInputError, match="does not exist"):
        list_inputs(tmp_path / "nope")
    pd.DataFrame({"file": ["a.mp4"]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(JobInputError, match="'path'"):
        list_inputs(tmp_path / "m.csv")
    pd.DataFrame({"path": ["a.mp4", "a.mp4"], "identity_id": ["x", "y"]}).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(JobInputError, match="duplicate"):
        list_inputs(tmp_path / "d.csv")


def test_plan_groups_by_split_and_interleaves_identities():
    items = [ClipItem(f"c{i}", f"/v/{i}.mp4", f"id{i // 2}", "val" if i == 3 else "train") for i in range(6)]
    plan = plan_shards(items, 2, "cfg")
    assert [s.name for s in plan] == ["train-000000", "train-000001", "train-000002", "val-000000"]
    assert sorted(c.clip_id for s in plan[:3] for c in s.clips) == ["c0", "c1", "c2", "c4", "c5"]
    assert [c.clip_id for c in plan[3].clips] == ["c3"]
    assert all(len({c.identity_id for c in s.clips}) == len(s.clips) for s in plan[:2])   # mixed identities
    again = plan_shards(list(reversed(items)), 2, "cfg")                 # listing order does not matter
    assert [[c.clip_id for c in s.clips] for s in again] == [[c.clip_id for c in s.clips] for s in plan]
    assert plan_shards(items, 2, "cfg")[0].fingerprint == plan[0].fingerprint
    assert plan_shards(items, 2, "other")[0].fingerprint != plan[0].fingerprint


def _outcomes(spec, bad=()):
    out = []
    for k, item in enumerate(spec.clips):
        o = ClipOutcome(item.clip_id, item.identity_id, item.split, item.path, "ok", frames=4)
        if item.clip_id in bad:
            o.status, o.stage, o.reason = "no_face", "track", "nobody there"
        else:
            o.samples = [encode_sample(random_sample(item.clip_id, s, seed=k * 10 + s)) for s in range(2)]
        out.append(o)
    return out


def test_write_shard_is_atomic_reproducible_and_marks_done(tmp_path):
    items = [ClipItem(f"c{i}", f"/v/{i}.mp4", "idA") for i in range(3)]
    spec = plan_shards(items, 3, "cfg")[0]
    a, b = OutputDir(tmp_path / "a"), OutputDir(tmp_path / "b")
    for out in (a, b):
        out.prepare()
        marker = write_shard(out, spec, list(reversed(_outcomes(spec, bad={"c1"}))))
    order = [c.clip_id for c in spec.clips]                                   # the plan's (seeded) order
    assert marker["keys"] == [f"{c}_s00{s}" for c in order if c != "c1" for s in range(2)]
    assert [r["status"] for r in marker["clips"]] == ["no_face" if c == "c1" else "ok" for c in order]
    assert [r["shard"] for r in marker["clips"]] == [None if c == "c1" else "train-000000.tar" for c in order]
    digests = {file_digest(Path(o.shards) / "train-000000.tar", "sha256") for o in (a, b)}
    assert digests == {marker["sha256"]}
    assert a.read_marker(spec)["samples"] == 4
    assert sorted(p.name for p in Path(a.shards).iterdir()) == ["train-000000.done.json", "train-000000.tar"]
    # a marker whose tar vanished, or from another plan, does not count as done
    other = plan_shards(items, 3, "changed-config")[0]
    assert a.read_marker(other) is None
    (Path(a.shards) / "train-000000.tar").unlink()
    assert a.read_marker(spec) is None


def test_prepare_removes_orphans_only(tmp_path):
    out = OutputDir(tmp_path)
    out.prepare()
    (Path(out.shards) / ".train-000000.tar.tmp-deadbeef").write_bytes(b"half")
    (Path(out.identities) / ".id.npz.tmp-0").write_bytes(b"half")
    (Path(out.shards) / "train-000001.tar").write_bytes(b"keep")
    removed = out.prepare()
    assert sorted(removed) == [".id.npz.tmp-0", ".train-000000.tar.tmp-deadbeef"]
    assert [p.name for p in Path(out.shards).iterdir()] == ["train-000001.tar"]


def test_empty_shard_has_marker_but_no_tar(tmp_path):
    items = [ClipItem("c0", "/v/0.mp4", "idA")]
    spec = plan_shards(items, 1, "cfg")[0]
    out = OutputDir(tmp_path)
    out.prepare()
    marker = write_shard(out, spec, _outcomes(spec, bad={"c0"}))
    assert marker["tar"] is None and marker["samples"] == 0
    assert json.loads(Path(out.marker_path(spec.name)).read_text())["clips"][0]["status"] == "no_face"
    assert out.read_marker(spec) is not None


def test_output_lock_admits_one_job_and_goes_with_its_holder(tmp_path):
    out = OutputDir(tmp_path / "out")
    with out.locked():
        with pytest.raises(OutputBusy, match="another job"):
            with OutputDir(tmp_path / "out").locked():
                pass
    with out.locked():                       # released on exit
        pass
    assert (tmp_path / "out" / ".job.lock").stat().st_size == 0


def test_retryable_clips_are_lost_or_crashed_ones():
    marker = {"clips": [{"clip_id": "a", "status": "ok"}, {"clip_id": "b", "status": "worker_lost"},
                        {"clip_id": "c", "status": "no_face"}, {"clip_id": "d", "status": "stage_error"}]}
    assert retryable_clips(marker) == ["b", "d"]


def test_manifest_counts_stage_seconds_and_attempts_apart():
    new = {"clip_id": "a", "status": "ok", "seconds": {"fit": 2.0, "render": 0.5}, "attempts": 2}
    old = {"clip_id": "b", "status": "ok", "seconds": {"fit": 1.0, "attempts": 3}}   # markers before the column
    rows = manifest_frame([{"clips": [old, new]}]).set_index("clip_id")
    assert rows.loc["a", "seconds_total"] == 2.5 and rows.loc["a", "attempts"] == 2
    assert rows.loc["b", "seconds_total"] == 1.0 and rows.loc["b", "attempts"] == 3
    assert json.loads(rows.loc["b", "seconds"]) == {"fit": 1.0}
