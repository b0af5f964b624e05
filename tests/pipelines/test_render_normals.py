"""Driving-normal precomputation (embedded Ray): sidecars equal to the on-the-fly render through
the frozen transfer module, resumable, read back by the reader, and the generator task then
renders nothing."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from processes import run_group

from training.data.shards import ShardDataset, collate, shard_urls

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
ROOT = Path(__file__).resolve().parents[2]


def _job(*args: str) -> tuple[int, dict]:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
    proc = run_group([sys.executable, "-m", "pipelines.render_normals", "--no-progress", "--workers", "1",
                      "--num-cpus", "1", *args], cwd=ROOT, env=env, timeout=600)   # Ray stopped by group
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-3000:]
    return proc.returncode, json.loads(lines[-1])


@pytest.fixture(scope="module")
def transfer_dir(tmp_path_factory, synthetic_model_path) -> Path:
    """A (random, seed 0) tiny transfer module exported as training exports it."""
    from models.head.head_model import PersonalizedHead
    from models.transfer import ExpressionTransfer
    head = PersonalizedHead.from_file(synthetic_model_path, subdivision_levels=1)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("transfer")
    ExpressionTransfer(num_face_vertices=head.num_face_vertices, flavor="tiny_cpu").save_pretrained(out)
    return out


def test_sidecar_normals_equal_the_on_the_fly_render(truth_shards, transfer_dir, synthetic_model_path, tmp_path):
    from models.generator.frames import transfer_normal_maps
    from models.head.head_model import PersonalizedHead
    from models.transfer import ExpressionTransfer
    from training.tasks.generator import RENDER_FIELDS, GeneratorTask

    common = ("--input", str(truth_shards), "--output", str(tmp_path / "nrm"), "--transfer-module",
              str(transfer_dir), "--head-model", str(synthetic_model_path))
    code, result = _job(*common)
    assert code == 0 and result["failed"] == 0 and result["written"] == result["source_shards"], result
    side = tmp_path / "nrm" / result["render_id"] / "shards"
    head = PersonalizedHead.from_file(synthetic_model_path, subdivision_levels=1)
    module = ExpressionTransfer.from_pretrained(transfer_dir).eval()
    urls = shard_urls(truth_shards, "train")
    ds = ShardDataset(urls, 2, resampled=False, convert=None, rank=0, world_size=1, normals=side,
                      fields=("frames", "smplx", "static_offsets"))
    assert len(ds.sidecar_maps["normals"]) == len(urls)
    for sample, normals in ds:
        smplx = {k: torch.from_numpy(v).float() for k, v in sample.smplx.items()}
        expect = transfer_normal_maps(head, module, smplx, torch.from_numpy(sample.static_offsets),
                                      sample.frames.shape[1], None)
        got = torch.from_numpy(normals.normals)
        assert got.shape == expect.shape and got.dtype == torch.uint8
        assert (expect.amax(-1) > 0).float().mean() > 0.05                  # a head is in the picture
        assert (got.int() - expect.int()).abs().max() <= 1, sample.key        # lossless codec: bit-exact
        assert normals.meta["render_id"] == result["render_id"]
    # a rerun writes nothing; another module renders elsewhere
    code, again = _job(*common)
    assert code == 0 and again["pending"] == 0 and again["written"] == 0
    # the task: sidecar normals in the batch -> the same model inputs, and nothing rendered
    fields = ("frames", "normals", *RENDER_FIELDS)
    task = GeneratorTask(frames=1, frame_stride=1, transfer_module=str(transfer_dir))
    on_the_fly = collate(list(ShardDataset(urls, 2, resampled=False, rank=0, world_size=1, fields=fields)))
    x = task.inputs(on_the_fly, None, training=False)
    read = collate(list(ShardDataset(urls, 2, resampled=False, rank=0, world_size=1, fields=("frames",),
                                     normals=side)))
    fresh = GeneratorTask(frames=1, frame_stride=1, transfer_module=str(transfer_dir))
    y = fresh.inputs(read, None, training=False)
    assert fresh._frozen["transfer"] is None                                  # nothing rendered
    assert torch.allclose(x["normals"], y["normals"], atol=2 / 127.5)


def test_bad_inputs_are_exit_2(truth_shards, tmp_path):
    code, result = _job("--input", str(truth_shards), "--output", str(tmp_path / "n"),
                        "--transfer-module", str(tmp_path / "nothing"))
    assert code == 2 and "not an exported transfer folder" in result["message"]
    code, result = _job("--input", str(truth_shards), "--output", str(tmp_path / "n"),
                        "--transfer-module", str(tmp_path), "--size", "30")
    assert code == 2 and "--size 30" in result["message"]
