"""A real 2-node Ray cluster on loopback (head 127.0.0.2, worker 127.0.0.3) running the job
through `ray job submit`. Processes are stopped by their process group, never `ray stop`."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from processes import kill_group

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _env() -> dict:
    # `ray start` from the venv, so the job's `python` is this one (deps-notes)
    return dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")


class LoopbackCluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp, self.procs = tmp, []
        self.ray_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))   # AF_UNIX paths <= 107 bytes
        self.port, self.dashboard = _free_port("127.0.0.2"), _free_port()

    def _start(self, name: str, *args: str) -> None:
        log = open(self.tmp / f"{name}.log", "w")
        proc = subprocess.Popen([str(BIN / "ray"), "start", "--block", "--num-cpus=1",
                                 f"--object-store-memory={256 << 20}", *args],
                                stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=self.tmp,
                                start_new_session=True)       # its own process group
        self.procs.append(proc)

    def start(self, timeout: float = 120) -> None:
        self._start("head", "--head", "--node-ip-address=127.0.0.2", f"--port={self.port}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard}",
                    f"--temp-dir={self.ray_dir}")
        self._wait(1, timeout)
        self._start("worker", f"--address=127.0.0.2:{self.port}", "--node-ip-address=127.0.0.3")
        self._wait(2, timeout)

    def _wait(self, nodes: int, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError((self.tmp / "head.log").read_text()[-3000:])
            out = subprocess.run([str(BIN / "ray"), "list", "nodes", "--format=json",
                                  f"--address=http://127.0.0.1:{self.dashboard}"],
                                 capture_output=True, text=True, env=_env())
            if out.returncode == 0:
                try:
                    alive = [n for n in json.loads(out.stdout) if n.get("state") == "ALIVE"]
                except json.JSONDecodeError:
                    alive = []
                if len(alive) >= nodes:
                    self.nodes = sorted(n["node_ip"] for n in alive)
                    return
            time.sleep(2)
        raise TimeoutError(f"{nodes} Ray node(s) not up in {timeout} s")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(wait)
                    time.sleep(0.5)
                except subprocess.TimeoutExpired:
                    continue
            kill_group(proc.pid)                           # leftovers of the group
        shutil.rmtree(self.ray_dir, ignore_errors=True)


@pytest.fixture
def cluster(tmp_path):
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.skip("the ray CLI is not installed in this environment")
    c = LoopbackCluster(tmp_path)
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.mark.extended
def test_job_submit_to_two_node_loopback_cluster(cluster, tmp_path, synthetic_model_path, video_fixtures):
    from preprocessing.synthetic.world import WorldConfig, generate_corpus

    assert cluster.nodes == ["127.0.0.2", "127.0.0.3"]
    corpus = generate_corpus(tmp_path / "corpus", WorldConfig(identities=2, clips_per_identity=1,
                                                              frames=12, size=128, seed=5),
                             synthetic_model_path, progress=False)
    rows = [{"path": str(corpus.out / r.video), "identity_id": r.identity_id, "clip_id": r.clip_id}
            for r in pd.read_parquet(corpus.out / "manifest.parquet").itertuples()]
    rows.append({"path": str(video_fixtures["text"]), "identity_id": "bad", "clip_id": "bad_text"})
    pd.DataFrame(rows).to_csv(tmp_path / "inputs.csv", index=False)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "head_model": str(synthetic_model_path), "clips_per_shard": 2, "max_failure_ratio": 0.5,
        "stages": {"max_frames": 12, "segment_frames": 12, "min_frames": 8,
                   "fit": {"iters_expression": 60}},
        "workers": {"num_cpus": 1}}))
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(BIN / "ray"), "job", "submit", f"--address=http://127.0.0.1:{cluster.dashboard}",
         "--working-dir", str(ROOT), "--", "python", "-m", "pipelines.preprocess", "--config", str(config),
         "--input", str(tmp_path / "inputs.csv"), "--output", str(out), "--no-progress"],
        capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(next(line for line in reversed(proc.stdout.splitlines()) if line.startswith("{")))
    assert result["last_run"]["mode"] == "cluster"
    assert result["last_run"]["nodes"] == ["127.0.0.2", "127.0.0.3"]
    manifest = pd.read_parquet(out / "manifest.parquet").set_index("clip_id")
    assert dict(manifest.status) == {"bad_text": "not_a_video", "id000_clip00": "ok", "id001_clip00": "ok"}
    assert set(manifest.node) <= {"127.0.0.2", "127.0.0.3"}
    from training.data.shards import ShardDataset, shard_urls
    keys = {s.key for s in ShardDataset(shard_urls(out), 4, resampled=False, convert=None, rank=0, world_size=1)}
    assert keys == {"id000_clip00_s000", "id001_clip00_s000"}
