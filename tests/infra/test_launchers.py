"""The training launchers on real schedulers here: `infra/slurm/train.sbatch` through `sbatch` on a
single-host SLURM (slurmctld + slurmd + munged, started and stopped by this test), and
`infra/torchrun/train.sh` as two torchrun nodes on loopback; the tiny transfer-module config on
exact-truth shards, one CPU process per node."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from slurm_cluster import SlurmCluster, missing_binaries
from processes import kill_group

REPO = Path(__file__).resolve().parents[2]
CONFIG = "configs/train/transfer_tiny.yaml"
SBATCH = REPO / "infra" / "slurm" / "train.sbatch"
TORCHRUN = REPO / "infra" / "torchrun" / "train.sh"


def tiny_run(tmp: Path, shards: Path) -> Path:
    """A second --config: a few steps, one checkpoint, no videos."""
    cfg = {"trainer": {"max_steps": 4, "max_epochs": -1, "enable_progress_bar": False, "log_every_n_steps": 1,
                       "check_val_every_n_epoch": 100},
           "model": {"init_args": {"vertex_samples": 256, "warmup_steps": 1}},
           "data": {"init_args": {"root": str(shards), "batch_size": 2, "samples_per_epoch": 4,
                                  "val_samples": 2, "shuffle_buffer": 4}}}
    path = tmp / "tiny_run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def job_env(tmp: Path) -> dict:
    return {"PYTHONPATH": str(REPO), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
            "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(tmp / "ext")),
            "RAY_USAGE_STATS_ENABLED": "0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = missing_binaries()
    assert not missing, f"SLURM is not installed ({missing}): .ci/run installs slurmctld slurmd slurm-client munge"
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


@pytest.mark.slow
def test_sbatch_runs_a_tiny_training(slurm, truth_shards, tmp_path):
    """Submitted from the repository as users do: SLURM runs the script's spool copy, which must
    still find the repository (SLURM_SUBMIT_DIR) and its Python; the log needs no folder."""
    out = tmp_path / "run"
    log = tmp_path / "slurm-%j.out"
    job = slurm.sbatch(["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
                        f"--output={log}", "--time=20", str(SBATCH.relative_to(REPO)), CONFIG,
                        "--config", tiny_run(tmp_path, truth_shards), "--out", out],
                       cwd=REPO, env=job_env(tmp_path))
    info = slurm.wait_job(job, timeout=600)
    text = (tmp_path / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-3000:]
    assert f"repo {REPO}" in text and "spool" not in text.split("repo ")[1].split(",")[0]
    assert (out / "checkpoints" / "last.ckpt").exists(), sorted(p.name for p in out.rglob("*"))[:40]


@pytest.mark.slow
def test_sbatch_refuses_a_missing_config(slurm, tmp_path):
    job = slurm.sbatch(["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
                        f"--output={tmp_path / 'slurm-%j.out'}", str(SBATCH.relative_to(REPO)), "configs/nope.yaml"],
                       cwd=REPO, env=job_env(tmp_path))
    info = slurm.wait_job(job, timeout=120)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0"
    assert "config configs/nope.yaml not found" in (tmp_path / f"slurm-{job}.out").read_text()


@pytest.mark.parametrize("unset", ["NNODES", "MASTER_ADDR", "NODE_RANK"])
def test_torchrun_launcher_refuses_without_its_cluster(unset, tmp_path):
    env = {**os.environ, "NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "GPUS": "1"}
    env.pop(unset)
    proc = subprocess.run(["bash", str(TORCHRUN), CONFIG], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and f"{unset} is not set" in proc.stderr


@pytest.mark.slow
def test_torchrun_two_nodes_on_loopback(truth_shards, tmp_path):
    """Node 0 and node 1 as two torchrun agents on 127.0.0.1: one DDP run of world size 2 (both
    ranks open the run's new sqlite MLflow store at once: training/logging.py serialises that)."""
    out, port = tmp_path / "run", _free_port()
    run = tiny_run(tmp_path, truth_shards)
    procs = []
    for rank in (0, 1):
        env = {**os.environ, **job_env(tmp_path), "NNODES": "2", "NODE_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "GPUS": "1"}
        procs.append(subprocess.Popen(["bash", str(TORCHRUN), CONFIG, "--config", str(run), "--out", str(out),
                                       "--trainer.strategy", "ddp"],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    try:
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            kill_group(p.pid)
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"node {rank}:\n{log[-3000:]}"
    import re
    members = {m for log in logs for m in re.findall(r"MEMBER: \d+/(\d+)", log)}
    assert members == {"2"}, logs[0][-3000:]                          # one world of two ranks (Lightning
    #                                                                   prints the line on ranks > 0)
    assert (out / "checkpoints" / "last.ckpt").exists()
