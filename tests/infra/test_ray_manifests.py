"""infra/ray: the KubeRay manifests pass the vendored, strict CRD schemas (with the real
`check-jsonschema` tool, offline) and say what a cluster needs: autoscaling on, a GPU group that
asks for GPUs in requests and limits, credentials from the Secret only, jobs that select the
cluster and run entry points and configs that exist in this repository."""
from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RAY = REPO / "infra" / "ray"
SCHEMAS = {"RayCluster": RAY / "schemas" / "rayclusters.ray.io_v1.json",
           "RayJob": RAY / "schemas" / "rayjobs.ray.io_v1.json"}
CHECK = Path(sys.executable).parent / "check-jsonschema"
MANIFESTS = sorted(p for p in RAY.glob("*.yaml") if yaml.safe_load(p.read_text())["kind"] in SCHEMAS)


def _load(name: str) -> dict:
    return yaml.safe_load((RAY / name).read_text())


def _check(schema: Path, manifest: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHECK), "--schemafile", str(schema), str(manifest)],
                          capture_output=True, text=True, timeout=120)


def test_there_are_a_cluster_and_jobs():
    kinds = sorted(yaml.safe_load(p.read_text())["kind"] for p in MANIFESTS)
    assert kinds.count("RayCluster") == 1 and kinds.count("RayJob") >= 2


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_manifest_passes_the_crd_schema(manifest):
    kind = yaml.safe_load(manifest.read_text())["kind"]
    proc = _check(SCHEMAS[kind], manifest)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_schema_is_strict(tmp_path):
    """A misspelt field or a wrong type is an error, not silently pruned as Kubernetes would."""
    data = _load("raycluster.yaml")
    data["spec"]["enableInTreeAutoscale"] = data["spec"].pop("enableInTreeAutoscaling")
    data["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "sixty-four"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    proc = _check(SCHEMAS["RayCluster"], bad)
    assert proc.returncode == 1
    assert "enableInTreeAutoscale" in proc.stdout and "sixty-four" in proc.stdout


def _containers(cluster: dict) -> list[dict]:
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_cluster_autoscales_with_cpu_and_gpu_groups():
    spec = _load("raycluster.yaml")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] and g["maxReplicas"] > 1
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["requests"]["nvidia.com/gpu"] == gpu["limits"]["nvidia.com/gpu"] >= 1
    cpu = groups["cpu"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in cpu["limits"] and "nvidia.com/gpu" not in cpu["requests"]


def test_credentials_come_from_the_secret_only():
    secret = _load("object-store-secret.example.yaml")
    assert secret["kind"] == "Secret"
    for container in _containers(_load("raycluster.yaml")):
        refs = [e["secretRef"]["name"] for e in container.get("envFrom", [])]
        assert refs == [secret["metadata"]["name"]], container["name"]
        names = {e["name"] for e in container.get("env", [])}
        assert not names & set(secret["stringData"]), "a credential spelt out in the manifest"
    values = yaml.safe_dump([yaml.safe_load(p.read_text()) for p in MANIFESTS])   # comments aside
    assert "CHANGE_ME" not in values and "AWS_SECRET_ACCESS_KEY" not in values


@pytest.mark.parametrize("manifest", [p for p in MANIFESTS if "rayjob" in p.name], ids=lambda p: p.name)
def test_jobs_select_the_cluster_and_run_what_exists(manifest):
    job = yaml.safe_load(manifest.read_text())["spec"]
    assert job["clusterSelector"] == {"ray.io/cluster": _load("raycluster.yaml")["metadata"]["name"]}
    assert not job.get("shutdownAfterJobFinishes"), "a selected cluster is shared: the job must not delete it"
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["python", "-m"]
    assert importlib.util.find_spec(argv[2]) is not None, argv[2]
    for flag, value in zip(argv, argv[1:]):
        if flag in ("--config", "--recipe"):
            assert (REPO / value).is_file() or (REPO / "configs" / "recipes" / f"{value}.yaml").is_file(), value
