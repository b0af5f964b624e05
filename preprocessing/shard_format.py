"""The shard folder's format: how clips are planned into shards, and how a shard, its done
marker and an identity file are written and read back (no Ray, no job policy; the preprocessing
job and the training data tools both write it, the training reader reads it).

Layout::

    ROOT/shards/<split>-<k>.tar          WebDataset shard (written to a temp name, then renamed)
    ROOT/shards/<split>-<k>.done.json    done marker: fingerprint, sha256, samples, manifest rows
    ROOT/identities/<identity>.npz       shared β and Δg of an identity (+ anchor clip)

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
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .clip_records import ClipItem, ClipOutcome, IdentityFit
from .files import file_digest

TMP_TAG = ".tmp-"
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
    """A shard folder's layout: ``shards/`` (tars and done markers) and ``identities/``."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.shards = self.root / "shards"
        self.identities = self.root / "identities"

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


def write_shard(out: ShardFolder, spec: ShardSpec, outcomes: list[ClipOutcome]) -> dict:
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
