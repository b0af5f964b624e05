"""The embedded sqlite MLflow store opened by several processes at the same moment (the ranks of
a multi-node launch, two trainings given one folder): all succeed, nothing lost."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WRITER = """
import sys, time
start = float(sys.argv[2])
while time.time() < start:
    time.sleep(0.001)
from training.logging import LocalMLFlowLogger
logger = LocalMLFlowLogger(out_dir=sys.argv[1], experiment_name="race", run_name=sys.argv[3])
logger.log_metrics({"value": float(sys.argv[3])}, step=0)
logger.finalize("success")
print(logger.run_id)
"""


@pytest.mark.extended
def test_processes_creating_one_new_store_at_once_all_succeed(tmp_path):
    import mlflow
    for round_ in range(1):
        out = tmp_path / f"round{round_}"
        start = time.time() + 4            # after every interpreter has imported mlflow
        procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(start), str(i)], cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
                 for i in range(3)]
        results = [p.communicate(timeout=180) for p in procs]
        for p, (stdout, stderr) in zip(procs, results):
            assert p.returncode == 0, stderr[-2000:]
        client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
        assert sorted(r.data.metrics["value"] for r in runs) == [0.0, 1.0, 2.0]
        assert all(r.info.status == "FINISHED" for r in runs)
