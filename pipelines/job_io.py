"""Inputs, shard plan and outputs of the preprocessing job (no Ray here; unit-testable).

Output layout::

    OUT/shards/<split>-<k>.tar          WebDataset shard (written to a temp name, then renamed)
    OUT/shards/<split>-<k>.done.json    done marker: fingerprint, sha256, samples, manifest rows
    OUT/identities/<identity>.npz       shared β and Δg of an identity (+ anchor clip)
    OUT/manifest.parquet                a row per input video (status, reason, shard, samples, ...)
    OUT/errors.parquet                  the rows that are not ok
    OUT/summary.json                    totals, failure ratio, shard list, the last run's figures
    OUT/.job.lock                       held (flock) by the running job: one job per output

Shard assignment is deterministic: the inputs of each split, sorted by clip id, are cut into
consecutive groups of ``clips_per_shard``; a shard's fingerprint covers its clips, the stage
configuration and the head model, so a rerun skips every shard whose marker matches.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from preprocessing.files import file_digest
from preprocessing.clip_records import ClipItem, ClipOutcome, IdentityFit
from preprocessing.sample_schema import safe_id

VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".flv", ".wmv", ".mpg", ".mpeg",
                  ".ts", ".3gp"}
TMP_TAG = ".tmp-"
MARKER_SUFFIX = ".done.json"


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


# -- shard plan ---------------------------------------------------------------------------

@dataclass
class ShardSpec:
    name: str                         # <split>-<k:06d>
    split: str
    clips: list[ClipItem]
    fingerprint: str


def fingerprint(*parts) -> str:
    blob = json.dumps(parts, sort_keys=True, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
    return hashlib.sha1(blob.encode()).hexdigest()


def plan_shards(items: list[ClipItem], clips_per_shard: int, config_fingerprint: str) -> list[ShardSpec]:
    by_split: dict[str, list[ClipItem]] = {}
    for item in items:
        by_split.setdefault(item.split, []).append(item)
    shards = []
    for split in sorted(by_split):
        group = by_split[split]
        for k in range(0, len(group), clips_per_shard):
            clips = group[k:k + clips_per_shard]
            shards.append(ShardSpec(f"{split}-{k // clips_per_shard:06d}", split, clips,
                                    fingerprint(config_fingerprint,
                                                [[c.clip_id, c.path, c.identity_id, c.split] for c in clips])))
    return shards


# -- output directory ---------------------------------------------------------------------

LOCK_NAME = ".job.lock"
#: statuses that say nothing about the clip itself (a lost worker, a crashing stage):
#: ``--retry-failed`` reprocesses the shards that hold them
RETRYABLE = ("worker_lost", "stage_error")


def retryable_clips(marker: dict) -> list[str]:
    """Clip ids of a done marker whose rows have a :data:`RETRYABLE` status."""
    return [r["clip_id"] for r in marker.get("clips", []) if r.get("status") in RETRYABLE]


class OutputDir:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.shards = self.root / "shards"
        self.identities = self.root / "identities"

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

    def prepare(self) -> list[Path]:
        """Create the folders; delete temporary files a killed run left behind (returned)."""
        self.shards.mkdir(parents=True, exist_ok=True)
        self.identities.mkdir(parents=True, exist_ok=True)
        orphans = [p for d in (self.shards, self.identities) for p in d.iterdir() if TMP_TAG in p.name]
        for p in orphans:
            p.unlink(missing_ok=True)
        return orphans

    def marker_path(self, name: str) -> Path:
        return self.shards / f"{name}{MARKER_SUFFIX}"

    def read_marker(self, spec: ShardSpec) -> dict | None:
        """The shard's done marker if it matches the plan and its tar is intact, else None."""
        path = self.marker_path(spec.name)
        try:
            marker = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if marker.get("fingerprint") != spec.fingerprint:
            return None
        if marker.get("tar") and not (self.shards / marker["tar"]).is_file():
            return None
        return marker

    # identities
    def identity_path(self, identity_id: str) -> Path:
        return self.identities / f"{identity_id}.npz"

    def load_identity(self, identity_id: str, config_fingerprint: str) -> IdentityFit | None:
        path = self.identity_path(identity_id)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["fingerprint"]) != config_fingerprint:
                    return None
                return IdentityFit(identity_id, "ok", anchor_clip_id=str(z["anchor_clip_id"]),
                                   betas=z["betas"], static_offsets=z["static_offsets"])
        except (OSError, KeyError, ValueError):
            return None

    def save_identity(self, fit: IdentityFit, config_fingerprint: str) -> None:
        buf = io.BytesIO()
        np.savez(buf, betas=fit.betas, static_offsets=fit.static_offsets,
                 anchor_clip_id=np.array(fit.anchor_clip_id), fingerprint=np.array(config_fingerprint))
        atomic_write(self.identity_path(fit.identity_id), buf.getvalue())


def atomic_write(path: Path, data: bytes) -> None:
    """Write to ``.<name>.tmp-<uuid>`` beside ``path``, fsync, rename over ``path``."""
    tmp = path.with_name(f".{path.name}{TMP_TAG}{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_shard(out: OutputDir, spec: ShardSpec, outcomes: list[ClipOutcome]) -> dict:
    """Write the shard's samples (clip order, then segment order) and its done marker.

    The tar is reproducible: fixed mtime, owner and mode, so the same samples give the same
    sha256. Returns the marker (which carries the manifest rows of the shard's clips).
    """
    import webdataset as wds

    by_id = {o.clip_id: o for o in outcomes}
    ordered = [by_id[c.clip_id] for c in spec.clips]
    samples = [s for o in ordered for s in o.samples]
    tar_name = f"{spec.name}.tar" if samples else None
    digest, size = None, 0
    if samples:
        final = out.shards / tar_name
        tmp = final.with_name(f".{final.name}{TMP_TAG}{uuid.uuid4().hex[:8]}")
        with open(tmp, "wb") as fh:
            with wds.TarWriter(fh, user="expportrait", group="expportrait", mode=0o644, mtime=0.0) as sink:
                for sample in samples:
                    sink.write(sample)
            fh.flush()
            os.fsync(fh.fileno())
        digest, size = file_digest(tmp, "sha256"), tmp.stat().st_size
        os.replace(tmp, final)
    rows = []
    for o in ordered:
        row = o.row()
        row["shard"] = tar_name if o.samples else None
        rows.append(row)
    marker = {"name": spec.name, "split": spec.split, "fingerprint": spec.fingerprint,
              "tar": tar_name, "sha256": digest, "bytes": size, "samples": len(samples),
              "keys": [s["__key__"] for s in samples], "clips": rows}
    atomic_write(out.marker_path(spec.name), json.dumps(marker, indent=1, default=str).encode())
    return marker


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
