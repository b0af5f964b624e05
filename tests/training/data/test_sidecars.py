"""Sidecar folders as the cluster configs name them (the precompute job's --output): the
`<id>/shards` that covers the shards is found; a run that could not train from what it reads
(`fields: []` without latents, a shard without its sidecar, two ids alike) is refused, and by
`python -m training.train` as exit 2 with one JSON line before any model is built."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from preprocessing.errors import UserError
from training.data.datamodule import ShardDataModule

REPO = Path(__file__).resolve().parents[3]


def _sidecars(out: Path, shards: Path, skip: str | None = None) -> Path:
    """Markers made from the shards' bytes (as the jobs commit them), but for shard ``skip``."""
    out.mkdir(parents=True)
    for marker in sorted((shards / "shards").glob("*.done.json")):
        name = marker.name[:-len(".done.json")]
        if name == skip:
            continue
        (out / f"{name}.tar").write_bytes(b"")
        (out / marker.name).write_text(json.dumps({"source_sha256": json.loads(marker.read_text())["sha256"]}))
    return out


def test_job_output_resolves_and_gaps_are_refused(truth_shards, tmp_path):
    job = tmp_path / "latents"
    full = _sidecars(job / "c0ffee" / "shards", truth_shards)
    dm = ShardDataModule(str(truth_shards), fields=[], latents=str(job), normals=str(job))
    assert dm.sidecars == {"latents": str(full), "normals": str(full)}
    with pytest.raises(UserError, match=r"fields is \[\] .* no latent sidecar"):
        ShardDataModule(str(truth_shards), fields=[], normals=str(job))
    with pytest.raises(UserError, match="no latents sidecar there"):
        ShardDataModule(str(truth_shards), fields=[], latents=str(tmp_path / "nothing"))
    partial = _sidecars(tmp_path / "partial" / "shards", truth_shards, skip="train-000000")
    with pytest.raises(UserError, match=r"1 of \d+ train shards have no sidecar .* does not decode 'frames'"):
        ShardDataModule(str(truth_shards), fields=[], latents=str(partial.parent))
    assert ShardDataModule(str(truth_shards), fields=["frames"], latents=str(partial)).sidecars["latents"] == \
        str(partial)                                          # frames decoded: the step encodes the rest
    _sidecars(job / "beef" / "shards", truth_shards)          # another codec's, covering as many
    with pytest.raises(UserError, match=r"2 ids .*\(beef, c0ffee\): name one"):
        ShardDataModule(str(truth_shards), fields=[], latents=str(job))


def test_train_command_refuses_missing_sidecars_with_exit_2(truth_shards, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "training.train", "fit", "--config",
                           str(REPO / "configs" / "train" / "dit_tiny_cpu.yaml"), "--out", str(tmp_path / "run"),
                           "--data.init_args.root", str(truth_shards), "--data.init_args.fields", "[]",
                           "--data.init_args.latents", str(tmp_path / "absent")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = json.loads(lines[-1])
    assert line["error"] == "UserError" and "no latents sidecar" in line["message"] and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()                    # refused before anything was set up
