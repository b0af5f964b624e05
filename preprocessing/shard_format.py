"""The shard folder's format: how clips are planned into shards, and how a shard, its done
marker and an identity file are written and read back (no Ray, no job policy; the preprocessing
job and the training data tools both write it, the training reader reads it).

Layout::

    ROOT/shards/<split>-<k>.tar          WebDataset shard
    ROOT/shards/<split>-<k>.done.json    done marker: fingerprint, sha256, samples, manifest rows
    ROOT/identities/<identity>.npz       shared β and Δg of an identity (+ anchor clip)

ROOT is a path or a URL (``s3://bucket/prefix``, :mod:`preprocessing.storage`). A shard is
committed by its marker: the tar is written whole under its final name (a local temp name and a
rename on a disk; one upload that appears at completion on an object store), then the marker
that names it, its size and sha256; a reader or a resumed job trusts only a shard whose marker
matches (no rename-is-atomic assumption).

Shard assignment is deterministic: the inputs of each split are put in a seeded order that
interleaves identities (:func:`interleaved`: each identity's clips in a seeded permutation,
then taken round-robin over the identities, themselves in a seeded permutation), and cut into
consecutive groups of ``clips_per_shard``, so a shard holds clips of up to ``clips_per_shard``
identities instead of one identity's consecutive clips. The plan is a pure function of the
clips (whatever order they are listed in) and the seed, so a resumed run plans the same
shards; a shard's fingerprint covers its clips and whatever the caller's
``config_fingerprint`` covers, so a rerun skips every shard whose marker matches.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass

import numpy as np

from . import storage
from .clip_records import ClipItem, ClipOutcome, IdentityFit
from .storage import TMP_TAG

MARKER_SUFFIX = ".done.json"


@dataclass
class ShardSpec:
    name: str                         # <split>-<k:06d>
    split: str
    clips: list[ClipItem]
    fingerprint: str


def fingerprint(*parts) -> str:
    blob = json.dumps(parts, sort_keys=True,
                      default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
    return hashlib.sha1(blob.encode()).hexdigest()


def _seeded_key(seed: int, text: str) -> str:
    return hashlib.sha1(f"{seed}:{text}".encode()).hexdigest()


def interleaved(items: list[ClipItem], seed: int = 0) -> list[ClipItem]:
    """The clips in the plan's order: identities in a seeded permutation, each identity's clips
    in a seeded permutation, taken round-robin (one clip of each identity in turn). Depends on
    the set of clips and the seed only (not on the order they are given in)."""
    by_identity: dict[str, list[ClipItem]] = {}
    for item in sorted(items, key=lambda c: _seeded_key(seed, c.clip_id)):
        by_identity.setdefault(item.identity_id, []).append(item)
    queues = [by_identity[i] for i in sorted(by_identity, key=lambda i: _seeded_key(seed, f"identity:{i}"))]
    out = []
    for turn in range(max((len(q) for q in queues), default=0)):
        out += [q[turn] for q in queues if turn < len(q)]
    return out


def plan_shards(items: list[ClipItem], clips_per_shard: int, config_fingerprint: str,
                seed: int = 0) -> list[ShardSpec]:
    """Shards of each split: the split's clips in :func:`interleaved` order, cut into groups of
    ``clips_per_shard`` (see the module docstring)."""
    by_split: dict[str, list[ClipItem]] = {}
    for item in items:
        by_split.setdefault(item.split, []).append(item)
    shards = []
    for split in sorted(by_split):
        group = interleaved(by_split[split], seed)
        for k in range(0, len(group), clips_per_shard):
            clips = group[k:k + clips_per_shard]
            shards.append(ShardSpec(f"{split}-{k // clips_per_shard:06d}", split, clips,
                                    fingerprint(config_fingerprint,
                                                [[c.clip_id, c.path, c.identity_id, c.split] for c in clips])))
    return shards


class ShardFolder:
    """A shard folder's layout: ``shards/`` (tars and done markers) and ``identities/``;
    ``root`` is a path or a URL (kept as text)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = os.fspath(root)
        self.shards = storage.url_join(self.root, "shards")
        self.identities = storage.url_join(self.root, "identities")

    def prepare(self) -> list[str]:
        """Create the folders (local disks; an object store has none); delete temporary files
        a killed local run left behind (their names are returned). An upload a killed job left
        unfinished on an object store is invisible and never committed."""
        orphans = []
        for folder in (self.shards, self.identities):
            storage.makedirs(folder)
            if storage.local_path(folder) is not None:
                orphans += [n for n in storage.listdir(folder) if TMP_TAG in n]
                for name in [n for n in storage.listdir(folder) if TMP_TAG in n]:
                    storage.remove(storage.url_join(folder, name))
        return orphans

    def path(self, name: str) -> str:
        """The location of a file in ``shards/``."""
        return storage.url_join(self.shards, name)

    def marker_path(self, name: str) -> str:
        return self.path(f"{name}{MARKER_SUFFIX}")

    def read_marker(self, spec: ShardSpec) -> dict | None:
        """The shard's done marker if it matches the plan and its tar is there with the
        committed size, else None."""
        try:
            marker = json.loads(storage.get_bytes(self.marker_path(spec.name)))
        except (OSError, ValueError):
            return None
        if marker.get("fingerprint") != spec.fingerprint:
            return None
        if marker.get("tar") and storage.size(self.path(marker["tar"])) != marker.get("bytes"):
            return None
        return marker

    # identities
    def identity_path(self, identity_id: str) -> str:
        return storage.url_join(self.identities, f"{identity_id}.npz")

    def load_identity(self, identity_id: str, config_fingerprint: str) -> IdentityFit | None:
        try:
            blob = storage.get_bytes(self.identity_path(identity_id))
        except (OSError, ValueError):
            return None
        try:
            with np.load(io.BytesIO(blob), allow_pickle=False) as z:
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


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` whole under ``path`` (a path or URL; :func:`preprocessing.storage.put_bytes`)."""
    storage.put_bytes(path, data)


class _HashingSink:
    """A write-only stream that hashes and counts what passes through to ``fh``."""

    def __init__(self, fh) -> None:
        self.fh, self.sha256, self.bytes = fh, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


def write_tar(location: str | os.PathLike, samples) -> tuple[str, int]:
    """Write encoded WebDataset samples as a reproducible tar (fixed mtime, owner and mode)
    whole under its final name (path or URL, :class:`preprocessing.storage.writer`); returns
    its sha256 and size, hashed while it streams out (no second read)."""
    import webdataset as wds

    with storage.writer(location) as fh:
        stream = _HashingSink(fh)
        with wds.TarWriter(stream, user="expportrait", group="expportrait", mode=0o644, mtime=0.0) as sink:
            for sample in samples:
                sink.write(sample)
    return stream.sha256.hexdigest(), stream.bytes


def write_shard(out: ShardFolder, spec: ShardSpec, outcomes: list[ClipOutcome]) -> dict:
    """Write the shard's samples (clip order, then segment order) and its done marker.

    The tar is reproducible: fixed mtime, owner and mode, so the same samples give the same
    sha256. Returns the marker (which carries the manifest rows of the shard's clips).
    """
    by_id = {o.clip_id: o for o in outcomes}
    ordered = [by_id[c.clip_id] for c in spec.clips]
    samples = [s for o in ordered for s in o.samples]
    tar_name = f"{spec.name}.tar" if samples else None
    digest, size = None, 0
    if samples:
        digest, size = write_tar(out.path(tar_name), samples)
    rows = []
    for o in ordered:
        row = o.row()
        row["shard"] = tar_name if o.samples else None
        rows.append(row)
    marker = {"name": spec.name, "split": spec.split, "fingerprint": spec.fingerprint,
              "tar": tar_name, "sha256": digest, "bytes": size, "samples": len(samples),
              "keys": [s["__key__"] for s in samples], "clips": rows}
    atomic_write(out.marker_path(spec.name), json.dumps(marker, indent=1, default=str).encode())  # the commit
    return marker
