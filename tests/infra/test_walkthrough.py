"""docs/infra.md's walk-through as one sequence, against the real stack (PostgreSQL, SeaweedFS S3,
the MLflow server on 127.0.0.1): `infra/services/walkthrough.sh` runs the preprocessing job into
``s3://``, trainings that read the bucket and log to the server, register, evaluate, promote, and
`mlflow models serve` on ``models:/expportrait@champion`` from a clean virtualenv made only from
the model's requirements (outside the repository), answering a POST with a playable mp4."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from processes import run_group
from services_stack import REPO, launcher, service_stack_fixture  # noqa: F401

pytestmark = [pytest.mark.services, pytest.mark.slow, pytest.mark.timeout(3600)]


def test_the_walkthrough_runs_from_a_bucket_to_a_served_model(service_stack, tmp_path):
    import av
    import mlflow
    work = tmp_path / "walk"
    env = {**{k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")},
           **service_stack["env"], "PYTHONPATH": str(REPO), "WALKTHROUGH_PREFIX": "s3://data/walkthrough-test",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = run_group(["bash", str(REPO / "infra" / "services" / "walkthrough.sh"), str(work)], timeout=3000,
                     cwd=REPO, env=env)
    if done.returncode != 0:        # the whole story in the report (an assertion message is cut short)
        print(done.stderr)
        for log in sorted(work.glob("*.log")):
            print(f"--- {log.name} (last 60 lines)\n" + "\n".join(log.read_text().splitlines()[-60:]))
        pytest.fail(f"walkthrough.sh exited {done.returncode}; its stderr and step logs are printed above",
                    pytrace=False)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ok"] and result["shards"] == "s3://data/walkthrough-test/pre"

    # the shards are objects in the bucket, the runs and the champion on the server
    s3 = launcher().s3_client(service_stack["s3_endpoint"], {"key": service_stack["key"],
                                                             "secret": service_stack["secret"]})
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="data", Prefix="walkthrough-test/pre/")["Contents"]]
    assert any(k.endswith(".tar") for k in keys) and any(k.endswith("manifest.parquet") for k in keys), keys
    client = mlflow.MlflowClient(tracking_uri=service_stack["mlflow"], registry_uri=service_stack["mlflow"])
    champion = client.get_model_version_by_alias("expportrait", "champion")
    assert int(champion.version) == result["version"]
    assert client.get_model_version("expportrait", champion.version).tags.get("gate.champion") == "passed"
    for experiment in ("transfer", "generator"):
        runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        assert runs and all(r.info.status == "FINISHED" for r in runs)
        assert all(r.data.params.get("root", "").startswith("s3://") or "s3://" in json.dumps(r.data.params)
                   for r in runs), [r.data.params for r in runs]

    # every driving frame comes back, at the driving clip's rate
    steps = [json.loads(line) for line in (work / "steps.jsonl").read_text().splitlines()]
    assert next(s for s in steps if "venv" in s)["venv"]
    with av.open(str(sorted((work / "corpus" / "clips").glob("*.mp4"))[1])) as c:
        driving = sum(1 for _ in c.decode(video=0))
        rate = float(c.streams.video[0].average_rate)
    with av.open(result["answer"]) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        answer_rate = float(c.streams.video[0].average_rate)
    assert len(frames) == driving and answer_rate == pytest.approx(rate), (len(frames), driving, answer_rate, rate)
    assert result["served"]["seed"] == 3
