"""The driving-normal sidecar schema: the generator's driving normal maps, rendered once through
the frozen expression-transfer module (``pipelines.render_normals``).

A sidecar tar ``<render_id>/shards/<split>-<k>.tar`` extends the preprocessing shard of the same
name: the same keys in the same order, two members per sample::

    <key>.drive.mp4        the normal maps (T, R, R, 3) uint8 of every frame of the sample, as
                           :func:`models.generator.frames.transfer_normal_maps` renders them
                           (R = ``normal_render_size(crop, size)``), in the ``lossless`` frame
                           codec of the shards (H.264 RGB at qp 0: decodes bit-exactly, a few
                           percent of the raw bytes for normal maps)
    <key>.drivemeta.json   the sidecar's version, the source shard's name and sha256, the
                           render id, ``render_size``, ``frames``

``render_id`` hashes what the pixels depend on: the transfer module's config and weights, the
head model's sha1, its subdivision and the generator's ``size`` (which sets the render side);
normals of another module (or of the same one retrained) never mix with these. Training reads
the sidecar beside the source shard when it exists (``ShardDataset(normals=...)``) and the
generator task then renders nothing.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from .sample_schema import SchemaError, decode_frames, encode_frames, json_bytes

NORMAL_VERSION = 1
MEMBERS = ("drive.mp4", "drivemeta.json")


@dataclass
class NormalSample:
    key: str
    normals: np.ndarray            # (T, R, R, 3) uint8
    meta: dict


def encode_normal_sample(sample: NormalSample) -> dict[str, bytes]:
    n = sample.normals
    if n.dtype != np.uint8 or n.ndim != 4 or n.shape[-1] != 3 or n.shape[1] != n.shape[2]:
        raise SchemaError(f"normals of {sample.key!r}: uint8 (T, R, R, 3), got {n.dtype} {n.shape}")
    return {"__key__": sample.key, "drive.mp4": encode_frames(n, "lossless"),
            "drivemeta.json": json_bytes(dict(sample.meta, normal_version=NORMAL_VERSION))}


def decode_normal_sample(raw: dict[str, bytes], max_frames: int | None = None) -> NormalSample:
    """Raw members -> :class:`NormalSample` (only the first ``max_frames`` frames decoded, when
    given: a window at frame 0 needs no more)."""
    key = raw.get("__key__")
    missing = [m for m in MEMBERS if m not in raw]
    if key is None or missing:
        raise SchemaError(f"normal sample {key!r} is missing {missing or ['__key__']}")
    try:
        meta = json.loads(raw["drivemeta.json"])
        normals = decode_frames(raw["drive.mp4"], max_frames)
    except Exception as exc:  # noqa: BLE001 - any decoder failure means a corrupt member
        raise SchemaError(f"normal sample {key!r}: {type(exc).__name__}: {exc}") from exc
    if meta.get("normal_version") != NORMAL_VERSION:
        raise SchemaError(f"normal sample {key!r} has version {meta.get('normal_version')}, "
                          f"reader expects {NORMAL_VERSION}")
    return NormalSample(key, normals, meta)


def render_id(transfer_id: str, head_sha1: str, subdivision: int, size: int | None) -> str:
    """16 hex digits naming a sidecar folder: the transfer module's id (``latent_schema.codec_id``
    of its config and weights), the head model file's sha1, the subdivision and the generator's
    ``size`` (None: the crop's)."""
    blob = json.dumps([transfer_id, head_sha1, int(subdivision), size])
    return hashlib.sha1(blob.encode()).hexdigest()[:16]
