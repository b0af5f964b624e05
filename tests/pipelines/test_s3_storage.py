"""preprocessing.storage against a real S3 server (SeaweedFS on 127.0.0.1) and a local folder:
the same calls for both."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "infra"))
from services_stack import s3_server_fixture  # noqa: E402,F401  (fixture `s3_server`)

from preprocessing import storage  # noqa: E402

pytestmark = [pytest.mark.services, pytest.mark.slow]


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for name, value in s3_server["env"].items():
        monkeypatch.setenv(name, value)
    return s3_server


def _roundtrip(root: str) -> None:
    target = storage.url_join(root, "a", "b.bin")
    assert not storage.exists(target)
    storage.put_bytes(target, b"hello")
    assert storage.exists(target) and storage.is_file(target)
    assert storage.get_bytes(target) == b"hello" and storage.size(target) == 5
    assert storage.is_dir(storage.url_join(root, "a"))
    with storage.writer(storage.url_join(root, "a", "c.bin")) as fh:
        fh.write(b"x" * 10)
    assert storage.listdir(storage.url_join(root, "a")) == ["b.bin", "c.bin"]
    assert storage.walk_files(root) == ["a/b.bin", "a/c.bin"]
    with storage.open_url(target) as fh:
        assert fh.read() == b"hello"
    storage.remove(target)
    storage.remove(target)                      # gone already: nothing
    assert not storage.exists(target)
    assert storage.listdir(storage.url_join(root, "missing")) == []


def test_storage_on_s3_and_local(s3_env, tmp_path):
    _roundtrip(f"{s3_env['data_bucket']}/storage-test")
    _roundtrip(str(tmp_path / "local"))
    _roundtrip(f"file://{tmp_path / 'file-url'}")


def test_failed_write_leaves_no_local_file(tmp_path):
    target = tmp_path / "x.bin"
    with pytest.raises(RuntimeError):
        with storage.writer(target) as fh:
            fh.write(b"partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_refused_credentials_are_an_environment_fault(s3_server, tmp_path):
    """Wrong S3 credentials: exit 3 and one JSON line naming the URL, before any work; the
    secret itself appears nowhere in the output."""
    import json
    import os
    import subprocess

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, **s3_server["env"], "AWS_SECRET_ACCESS_KEY": "wrong-" + s3_server["secret"],
           "PYTHONPATH": str(root), "RAY_USAGE_STATS_ENABLED": "0"}
    manifest = f"{s3_server['data_bucket']}/refused/inputs.csv"
    proc = subprocess.run([sys.executable, "-m", "pipelines.preprocess", "--input", manifest,
                           "--output", f"{s3_server['data_bucket']}/refused/out", "--no-progress"],
                          capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["error"] == "EnvironmentFault" and manifest in result["message"]
    assert s3_server["secret"] not in proc.stdout + proc.stderr
