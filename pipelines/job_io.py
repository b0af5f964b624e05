"""Inputs and outputs of the preprocessing job (no Ray here; unit-testable); the shard plan
and the shard format it writes are :mod:`preprocessing.shard_format`.

Output layout::

    OUT/shards/<split>-<k>.tar          WebDataset shard (committed by its done marker)
    OUT/shards/<split>-<k>.done.json    done marker: fingerprint, sha256, samples, manifest rows
    OUT/identities/<identity>.npz       shared β and Δg of an identity (+ anchor clip)
    OUT/manifest.parquet                a row per input video (status, reason, shard, samples, ...)
    OUT/errors.parquet                  the rows that are not ok
    OUT/summary.json                    totals, failure ratio, shard list, the last run's figures
    OUT/.job.lock                       held by the running job: one job per output (a local
                                        flock; on an object store a lease object, see
                                        :meth:`OutputDir.locked`)

OUT and the input are paths or URLs (``s3://bucket/prefix``; :mod:`preprocessing.storage`).

A shard's fingerprint covers its clips, the stage configuration and the head model
(:func:`preprocessing.shard_format.plan_shards`), so a rerun skips every shard whose marker matches.
"""
from __future__ import annotations

import fcntl
import io
import json
import os
import socket
import threading
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from preprocessing import storage
from preprocessing.clip_records import ClipItem
from preprocessing.sample_schema import safe_id
from preprocessing.shard_format import ShardFolder, atomic_write

VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".flv", ".wmv", ".mpg", ".mpeg",
                  ".ts", ".3gp"}


class JobInputError(ValueError):
    """The job's input (folder or manifest) cannot be used; the message says why."""


class OutputBusy(JobInputError):
    """Another job holds the output folder's lock."""


# -- inputs -------------------------------------------------------------------------------

def list_inputs(source: str | os.PathLike, limit: int | None = None) -> list[ClipItem]:
    """Clips from a folder of videos or a manifest (.parquet / .csv), sorted by clip id; the
    folder or manifest is a path or a URL (a video's path is then a URL too).

    Folder: every file with a video suffix, recursively; the identity is the first folder
    below the root (files directly in the root are their own identity); split ``train``.
    Manifest columns: ``path`` (or ``video``), ``identity_id`` (or ``identity``), optional
    ``split`` and ``clip_id``; relative paths are relative to the manifest. ``limit`` keeps
    the first clips in that order (deterministic).
    """
    source = os.fspath(source)
    remote = storage.is_url(source)
    if remote and storage.is_dir(source) or not remote and Path(source).is_dir():
        items = []
        for rel in storage.walk_files(source) if remote else \
                sorted(p.relative_to(source).as_posix() for p in Path(source).rglob("*") if p.is_file()):
            stem, suffix = os.path.splitext(rel)
            if suffix.lower() in VIDEO_SUFFIXES:
                parts = rel.split("/")
                identity = parts[0] if len(parts) > 1 else stem
                where = storage.url_join(source, rel) if remote else str((Path(source) / rel).resolve())
                items.append(ClipItem(safe_id(stem), where, safe_id(identity), "train"))
    elif storage.is_file(source):
        items = _manifest_items(source)
    else:
        raise JobInputError(f"input {source} does not exist (a folder of videos or a manifest)")
    dupes = sorted(c for c, n in Counter(i.clip_id for i in items).items() if n > 1)
    if dupes:
        raise JobInputError(f"{len(dupes)} duplicate clip id(s) in {source}: {dupes[:5]}")
    items.sort(key=lambda i: i.clip_id)
    return items[:limit] if limit else items


def _manifest_items(path: str) -> list[ClipItem]:
    import pandas as pd

    if path.endswith(".parquet"):
        fs, inner = storage.arrow_filesystem(path)
        df = pd.read_parquet(inner, filesystem=fs)
    elif path.endswith(".csv"):
        with storage.open_url(path) as fh:
            df = pd.read_csv(fh, dtype=str, keep_default_na=False)
    else:
        raise JobInputError(f"manifest {path} must be .parquet or .csv")
    path_col = next((c for c in ("path", "video") if c in df.columns), None)
    id_col = next((c for c in ("identity_id", "identity") if c in df.columns), None)
    if path_col is None or id_col is None:
        raise JobInputError(f"manifest {path} needs a 'path' (or 'video') and an 'identity_id' "
                            f"(or 'identity') column; it has {list(df.columns)}")
    # Column-wise, no per-row filesystem calls: a manifest of a million rows lists in seconds.
    raw_paths = df[path_col].astype(str).tolist()
    paths = _resolve_against(path, raw_paths)
    clip_col = df["clip_id"].astype(str).tolist() if "clip_id" in df.columns else [""] * len(df)
    clips = [c if c and c != "None" and c != "nan" else os.path.splitext(p)[0].replace("/", "__")
             for c, p in zip(clip_col, raw_paths)]
    splits = (df["split"].astype(str).tolist() if "split" in df.columns else ["train"] * len(df))
    identities = df[id_col].astype(str).tolist()
    return [ClipItem(safe_id(c), p, safe_id(i), s if s and s not in ("None", "nan") else "train")
            for c, p, i, s in zip(clips, paths, identities, splits)]


def _resolve_against(manifest: str, raw_paths: list[str]) -> list[str]:
    """Absolute paths and URLs stay; relative ones are relative to the manifest's folder."""
    import posixpath

    if storage.is_url(manifest):
        base = manifest.rsplit("/", 1)[0]
        scheme, rest = base.split("://", 1)
        return [p if "://" in p else f"{scheme}://{posixpath.normpath(posixpath.join(rest, p))}"
                for p in raw_paths]
    base = os.path.abspath(os.path.dirname(storage.local_path(manifest)))
    return [p if "://" in p else os.path.normpath(p if os.path.isabs(p) else os.path.join(base, p))
            for p in raw_paths]


# -- output directory (the shard plan and the shard format: preprocessing.shard_format) -----

LOCK_NAME = ".job.lock"
#: statuses that say nothing about the clip itself (a lost worker, a crashing stage):
#: ``--retry-failed`` reprocesses the shards that hold them
RETRYABLE = ("worker_lost", "stage_error")


def retryable_clips(marker: dict) -> list[str]:
    """Clip ids of a done marker whose rows have a :data:`RETRYABLE` status."""
    return [r["clip_id"] for r in marker.get("clips", []) if r.get("status") in RETRYABLE]


#: an object-store lock's lease: renewed every third of it while the job runs
LOCK_LEASE_SECONDS = 120.0


class OutputDir(ShardFolder):
    """The job's output folder (a path or a URL): the shard folder plus the job's lock."""

    @contextmanager
    def locked(self) -> Iterator[None]:
        """One job per output: a second job stops at once with :class:`OutputBusy`.

        Local folder: an exclusive ``flock`` on ``OUT/.job.lock`` (it goes with the process;
        the file is created once and never written, so a rerun writes nothing). Object store
        (no flock there): :func:`object_lock`."""
        if storage.local_path(self.root) is None:
            with object_lock(storage.url_join(self.root, LOCK_NAME)):
                yield
            return
        root = Path(storage.local_path(self.root))
        root.mkdir(parents=True, exist_ok=True)
        with open(root / LOCK_NAME, "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                raise OutputBusy(f"output {self.root} is being written by another job (it holds "
                                 f"{root / LOCK_NAME}); run one job per output folder") from exc
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _lock_is_live(holder: dict) -> bool:
    """A lock object still holds: its lease has not expired, and when it was taken on this
    host, its process is alive (a job killed here is taken over at once, not after the lease)."""
    if float(holder.get("expires", 0)) < time.time():
        return False
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, KeyError, ValueError):
            pass
    return True


def _read_lock(url: str) -> dict | None:
    try:
        return json.loads(storage.get_bytes(url))
    except (OSError, ValueError):
        return None


@contextmanager
def object_lock(url: str, lease: float | None = None) -> Iterator[None]:
    """A lease object on an object store: ``{"owner", "host", "pid", "expires"}`` (no secret).

    Taken when there is none or it is stale (lease expired, or its process on this host is
    gone); a thread renews it every third of the lease; deleted at the end. Two jobs starting in
    the same instant could both write it: each reads it back after a pause and only the one
    whose owner id is there goes on (S3 is read-after-write consistent). The lease is
    ``$EXPPORTRAIT_LOCK_LEASE_S`` or :data:`LOCK_LEASE_SECONDS`."""
    lease = lease or float(os.environ.get("EXPPORTRAIT_LOCK_LEASE_S", LOCK_LEASE_SECONDS))
    owner = uuid.uuid4().hex
    record = {"owner": owner, "host": socket.gethostname(), "pid": os.getpid()}

    def write() -> None:
        storage.put_bytes(url, json.dumps({**record, "expires": time.time() + lease}).encode())

    holder = _read_lock(url)
    if holder is not None and _lock_is_live(holder):
        raise OutputBusy(f"output lock {url} is held by another job (host {holder.get('host')}, pid "
                         f"{holder.get('pid')}, lease until {time.ctime(float(holder['expires']))}); "
                         f"run one job per output folder")
    write()
    time.sleep(min(1.0, lease / 10))
    holder = _read_lock(url)
    if holder is None or holder.get("owner") != owner:
        raise OutputBusy(f"output lock {url} was taken by another job starting at the same time")
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lease / 3):
            write()

    thread = threading.Thread(target=renew, name="output-lock-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if (_read_lock(url) or {}).get("owner") == owner:
            storage.remove(url)


# -- manifests ----------------------------------------------------------------------------

MANIFEST_COLUMNS = ["clip_id", "identity_id", "split", "path", "status", "stage", "reason", "shard",
                    "samples", "frames", "notes", "seconds_total", "seconds", "attempts", "error_type", "qc",
                    "node", "started_at", "finished_at"]


def manifest_frame(markers: list[dict]):
    """A row per input video from the shards' done markers (nested fields as JSON text)."""
    import pandas as pd

    rows = []
    for marker in markers:
        for r in marker["clips"]:
            seconds = dict(r.get("seconds") or {})
            attempts = r.get("attempts") or seconds.pop("attempts", 1)   # older markers kept it in seconds
            rows.append({**{k: r.get(k) for k in MANIFEST_COLUMNS},
                         "notes": json.dumps(r.get("notes") or []), "attempts": int(attempts),
                         "seconds_total": round(float(sum(seconds.values())), 3),
                         "seconds": json.dumps(seconds), "qc": json.dumps(r.get("qc") or {})})
    df = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    return df.sort_values("clip_id", kind="stable").reset_index(drop=True)


def write_if_changed(path: str | os.PathLike, data: bytes) -> bool:
    """Whole write (path or URL) unless it already holds exactly ``data`` (reruns write nothing)."""
    if storage.size(path) == len(data) and storage.get_bytes(path) == data:
        return False
    atomic_write(path, data)
    return True


def parquet_bytes(df) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()
