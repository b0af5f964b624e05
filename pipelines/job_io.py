"""Inputs and outputs of the preprocessing job (no Ray here; unit-testable); the shard plan
and the shard format it writes are :mod:`preprocessing.shard_format`.

Output layout::

    OUT/shards/<split>-<k>.tar          WebDataset shard (written to a temp name, then renamed)
    OUT/shards/<split>-<k>.done.json    done marker: fingerprint, sha256, samples, manifest rows
    OUT/identities/<identity>.npz       shared β and Δg of an identity (+ anchor clip)
    OUT/manifest.parquet                a row per input video (status, reason, shard, samples, ...)
    OUT/errors.parquet                  the rows that are not ok
    OUT/summary.json                    totals, failure ratio, shard list, the last run's figures
    OUT/.job.lock                       held (flock) by the running job: one job per output

A shard's fingerprint covers its clips, the stage configuration and the head model
(:func:`preprocessing.shard_format.plan_shards`), so a rerun skips every shard whose marker matches.
"""
from __future__ import annotations

import fcntl
import io
import json
import os
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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
    """Clips from a folder of videos or a manifest (.parquet / .csv), sorted by clip id.

    Folder: every file with a video suffix, recursively; the identity is the first folder
    below the root (files directly in the root are their own identity); split ``train``.
    Manifest columns: ``path`` (or ``video``), ``identity_id`` (or ``identity``), optional
    ``split`` and ``clip_id``; relative paths are relative to the manifest. ``limit`` keeps
    the first clips in that order (deterministic).
    """
    source = Path(source)
    if source.is_dir():
        items = []
        for p in sorted(source.rglob("*")):
            if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES:
                rel = p.relative_to(source)
                identity = rel.parts[0] if len(rel.parts) > 1 else rel.stem
                items.append(ClipItem(safe_id(str(rel.with_suffix(""))), str(p.resolve()),
                                      safe_id(identity), "train"))
    elif source.is_file():
        items = _manifest_items(source)
    else:
        raise JobInputError(f"input {source} does not exist (a folder of videos or a manifest)")
    dupes = sorted(c for c, n in Counter(i.clip_id for i in items).items() if n > 1)
    if dupes:
        raise JobInputError(f"{len(dupes)} duplicate clip id(s) in {source}: {dupes[:5]}")
    items.sort(key=lambda i: i.clip_id)
    return items[:limit] if limit else items


def _manifest_items(path: Path) -> list[ClipItem]:
    import pandas as pd

    if path.suffix == ".parquet":
        df = pd.read_parquet(path)
    elif path.suffix == ".csv":
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    else:
        raise JobInputError(f"manifest {path} must be .parquet or .csv")
    path_col = next((c for c in ("path", "video") if c in df.columns), None)
    id_col = next((c for c in ("identity_id", "identity") if c in df.columns), None)
    if path_col is None or id_col is None:
        raise JobInputError(f"manifest {path} needs a 'path' (or 'video') and an 'identity_id' "
                            f"(or 'identity') column; it has {list(df.columns)}")
    # Column-wise, no per-row filesystem calls: a manifest of a million rows lists in seconds.
    base = os.path.abspath(path.parent)
    raw_paths = df[path_col].astype(str).tolist()
    paths = [os.path.normpath(p if os.path.isabs(p) else os.path.join(base, p)) for p in raw_paths]
    clip_col = df["clip_id"].astype(str).tolist() if "clip_id" in df.columns else [""] * len(df)
    clips = [c if c and c != "None" and c != "nan" else os.path.splitext(p)[0].replace("/", "__")
             for c, p in zip(clip_col, raw_paths)]
    splits = (df["split"].astype(str).tolist() if "split" in df.columns else ["train"] * len(df))
    identities = df[id_col].astype(str).tolist()
    return [ClipItem(safe_id(c), p, safe_id(i), s if s and s not in ("None", "nan") else "train")
            for c, p, i, s in zip(clips, paths, identities, splits)]


# -- output directory (the shard plan and the shard format: preprocessing.shard_format) -----

LOCK_NAME = ".job.lock"
#: statuses that say nothing about the clip itself (a lost worker, a crashing stage):
#: ``--retry-failed`` reprocesses the shards that hold them
RETRYABLE = ("worker_lost", "stage_error")


def retryable_clips(marker: dict) -> list[str]:
    """Clip ids of a done marker whose rows have a :data:`RETRYABLE` status."""
    return [r["clip_id"] for r in marker.get("clips", []) if r.get("status") in RETRYABLE]


class OutputDir(ShardFolder):
    """The job's output folder: the shard folder plus the job's lock."""

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold ``OUT/.job.lock`` (an exclusive ``flock``) while the job runs: a second job on
        the same output stops at once with :class:`OutputBusy` instead of racing this one.
        The lock goes with the process, so a killed job leaves none behind; the file is
        created once and never written, so a rerun still writes nothing."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK_NAME, "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                raise OutputBusy(f"output {self.root} is being written by another job (it holds "
                                 f"{self.root / LOCK_NAME}); run one job per output folder") from exc
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


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


def write_if_changed(path: Path, data: bytes) -> bool:
    """Atomic write unless the file already holds exactly ``data`` (reruns write nothing)."""
    if path.is_file() and path.read_bytes() == data:
        return False
    atomic_write(path, data)
    return True


def parquet_bytes(df) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()
