"""A real single-host SLURM for the tests: munged, slurmctld and slurmd (Debian's `slurm-wlm`)
started in a temporary folder with their own key, sockets, ports and state, on 127.0.0.1, and
stopped by the pids this module started (never `scontrol shutdown` of someone else's cluster).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin") / name)


CONF = """ClusterName=exptest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.sock
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
MinJobAge=3600
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """``with SlurmCluster(tmp) as slurm: slurm.sbatch([...])`` — one node, ``localhost``."""

    def __init__(self, root: Path, cpus: int | None = None) -> None:
        self.root = Path(root)
        self.cpus = cpus or os.cpu_count() or 1
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.root / "slurm.conf")}

    def __enter__(self) -> "SlurmCluster":
        for d in ("munge", "state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        (self.root / "slurm.conf").write_text(CONF.format(root=self.root, ctld_port=_free_port(),
                                                          d_port=_free_port(), cpus=self.cpus))
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        m = self.root / "munge"
        self._spawn([_binary("munged"), "--foreground", "--force", f"--socket={m}/munge.sock",
                     f"--key-file={m}/munge.key", f"--pid-file={m}/munged.pid", f"--seed-file={m}/seed",
                     f"--log-file={self.root}/log/munged.log"], "munged")
        self._wait(lambda: (m / "munge.sock").exists(), "munged's socket")
        conf = str(self.root / "slurm.conf")
        self._spawn([_binary("slurmctld"), "-D", "-f", conf], "slurmctld")
        self._spawn([_binary("slurmd"), "-D", "-f", conf, "-N", "localhost"], "slurmd")
        self._wait(self._node_idle, "the node to be idle")

    def _spawn(self, cmd: list[str], name: str) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))

    def _node_idle(self) -> bool:
        out = subprocess.run([_binary("sinfo"), "-h", "-o", "%t"], env=self.env, capture_output=True, text=True)
        return out.returncode == 0 and out.stdout.strip() == "idle"

    def _wait(self, ready, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited while waiting for {what}: see {self.root / 'log'}")
            if ready():
                return
            time.sleep(0.5)
        raise TimeoutError(f"no {what} within {timeout} s: see {self.root / 'log'}")

    def sbatch(self, args: list[str], cwd: Path, env: dict | None = None) -> int:
        """Submit; the job id."""
        out = subprocess.run([_binary("sbatch"), *map(str, args)], cwd=cwd, env={**self.env, **(env or {})},
                             capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed ({out.returncode}): {out.stderr}")
        return int(re.search(r"Submitted batch job (\d+)", out.stdout).group(1))

    def job(self, job_id: int) -> dict[str, str]:
        out = subprocess.run([_binary("scontrol"), "show", "job", "-o", str(job_id)], env=self.env,
                             capture_output=True, text=True, timeout=30)
        return dict(re.findall(r"(\w+)=(\S*)", out.stdout))

    def wait_job(self, job_id: int, timeout: float) -> dict[str, str]:
        """The job's record once it left the queue (JobState COMPLETED, FAILED, ...)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") not in (None, "PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
                return info
            time.sleep(2)
        subprocess.run([_binary("scancel"), str(job_id)], env=self.env, timeout=30)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout} s")

    def stop(self) -> None:
        """Stop the daemons this cluster started, by pid (and their process groups: job steps)."""
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=15)
        self.procs.clear()

    def __exit__(self, *exc) -> None:
        self.stop()
