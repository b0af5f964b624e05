"""The real service stack for tests: PostgreSQL, SeaweedFS S3 and an MLflow server on 127.0.0.1,
started by `infra/services/services.py` (imported by path: `infra/` is not a package) and stopped
by the pids it recorded.

Reuse from any test module::

    from services_stack import service_stack_fixture   # noqa: F401  (fixture `service_stack`)

with tests/infra on sys.path (pytest puts it there for tests in this folder; elsewhere
``sys.path.insert(0, str(Path(__file__).parents[1] / "infra"))``). The fixture yields the `up`
summary (keys ``mlflow``, ``s3_endpoint``, ``postgres``, ``key``, ``secret``, ``artifacts``,
``data_bucket``) plus ``root`` and ``env`` (what a client subprocess needs: MLFLOW_TRACKING_URI and
the S3 variables).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "infra" / "services" / "services.py"


def launcher():
    """The launcher module (`infra/services/services.py`), imported once by path."""
    name = "expportrait_infra_services"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, LAUNCHER)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def stack_root() -> Path:
    """A fresh folder PostgreSQL's `postgres` account can enter when we are root (pytest's own
    tmp folders are 0700 root): a 0711 folder in the system's temp dir."""
    root = Path(tempfile.mkdtemp(prefix="expportrait-services-"))
    os.chmod(root, 0o711)
    return root


def client_env(summary: dict) -> dict:
    """Environment variables of a client process of the stack (tracking URI + S3 credentials)."""
    return launcher().client_env(summary)


@pytest.fixture(scope="session", name="service_stack")
def service_stack_fixture():
    """The running stack for the whole session; stopped by pid and its folder removed after."""
    services = launcher()
    root = stack_root()
    try:
        summary = services.up(root / "stack")
        summary["root"] = root / "stack"
        summary["env"] = client_env(summary)
        yield summary
    finally:
        services.down(root / "stack", timeout=1)         # throwaway data: no need for a polite stop
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session", name="s3_server")
def s3_server_fixture():
    """SeaweedFS's S3 alone (faster than the whole stack), through the same launcher: yields
    ``s3_endpoint``, ``key``, ``secret``, ``data_bucket`` and ``env`` (the AWS_* variables a
    client process needs, AWS_ENDPOINT_URL included); stopped by pid after the session."""
    services = launcher()
    root = stack_root()
    layout = services.Layout(root / "s3only")
    record = None
    try:
        layout.root.mkdir(parents=True)
        creds = services.load_credentials(layout)
        record = services.start_s3(layout, creds, services.free_ports(8))
        record.pop("_proc", None)
        endpoint = record["address"]
        env = {**services.mlflow_env(creds, endpoint), "AWS_ENDPOINT_URL": endpoint}
        yield {"s3_endpoint": endpoint, "key": creds["key"], "secret": creds["secret"],
               "data_bucket": f"s3://{services.DATA_BUCKET}", "env": env, "root": layout.root}
    finally:
        if record is not None:
            services.stop(record, "s3", timeout=1)         # SeaweedFS takes the whole polite wait
        shutil.rmtree(root, ignore_errors=True)
