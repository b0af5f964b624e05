"""The driving-normal precompute from a preprocessing output in the bucket to sidecars in the
bucket (SeaweedFS on 127.0.0.1), as the cluster config names them (the job's --output), and the
training data module finding its <render_id>/shards there."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from processes import run_group

sys.path.insert(0, str(Path(__file__).parents[1] / "infra"))
from services_stack import s3_server_fixture  # noqa: E402,F401  (fixture `s3_server`)

from preprocessing import storage  # noqa: E402

pytestmark = [pytest.mark.services, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.extended
def test_normals_from_and_into_the_bucket(s3_server, truth_shards, synthetic_model_path, tmp_path, monkeypatch):
    from models.head.head_model import PersonalizedHead
    from models.transfer import ExpressionTransfer
    for name, value in s3_server["env"].items():
        monkeypatch.setenv(name, value)
    source = f"{s3_server['data_bucket']}/normals-test/source"
    for path in sorted((truth_shards / "shards").iterdir()):               # the shards, into S3
        storage.put_bytes(f"{source}/shards/{path.name}", path.read_bytes())
    head = PersonalizedHead.from_file(synthetic_model_path, subdivision_levels=1)
    torch.manual_seed(0)
    ExpressionTransfer(num_face_vertices=head.num_face_vertices, flavor="tiny_cpu").save_pretrained(tmp_path / "tm")
    out = f"{s3_server['data_bucket']}/normals-test/nrm"
    args = ["--input", source, "--output", out, "--transfer-module", str(tmp_path / "tm"),
            "--head-model", str(synthetic_model_path)]
    proc = run_group([sys.executable, "-m", "pipelines.render_normals", "--no-progress", "--workers", "1",
                      "--num-cpus", "1", *args], cwd=ROOT, timeout=600,
                     env={**os.environ, **s3_server["env"], "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)})
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    markers = [p for p in (truth_shards / "shards").iterdir() if p.name.endswith(".done.json")]
    assert proc.returncode == 0 and result["written"] == len(markers) and result["failed"] == 0, result
    side = f"{out}/{result['render_id']}/shards"
    assert result["output"] == f"{out}/{result['render_id']}"
    assert sorted(storage.listdir(side)) == sorted([p.name for p in markers] + [p.name[:-len(".done.json")] + ".tar"
                                                                                 for p in markers])
    from training.data.datamodule import ShardDataModule
    dm = ShardDataModule(source, fields=["frames"], normals=out, batch_size=1, samples_per_epoch=2)
    assert dm.sidecars["normals"] == side                     # the job's --output, resolved on S3
    batch = next(iter(dm.train_dataloader()))
    maps = batch["driving_normals"]
    assert maps.shape[1:] == batch["frames"].shape[1:] and maps.dtype == torch.uint8
