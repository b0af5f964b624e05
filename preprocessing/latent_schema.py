"""The latent sidecar schema: VAE latents of a shard's samples, precomputed once.

A sidecar tar ``<codec_id>/shards/<split>-<k>.tar`` extends the preprocessing shard of the same
name: the same keys in the same order, two members per sample::

    <key>.latents.npz    ``video`` (16, k+1, H/8, W/8) float16: normalised latents of the
                         sample's first ``frames`` = 4k+1 frames; ``reference`` (16, k+1, H/8,
                         W/8) float16: Wan I2V's reference latent of frame 0 ([frame 0, 0, ...]
                         over the same 4k+1 frames)
    <key>.latmeta.json   the sidecar's version, the source shard's name, sha256 and sample
                         schema version, the codec id, ``frames``

``codec_id`` is a hash of the codec's config and weights, so latents of another VAE (or of
the same VAE retrained) never mix with these. Training reads the sidecar beside the source
shard when it exists (:mod:`training.data.shards`) and encodes on the fly otherwise.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from .sample_schema import SchemaError, json_bytes, load_npz, npz_bytes

LATENT_VERSION = 1
MEMBERS = ("latents.npz", "latmeta.json")


@dataclass
class LatentSample:
    key: str
    video: np.ndarray             # (C, k+1, h, w) float16
    reference: np.ndarray         # (C, k+1, h, w) float16
    meta: dict


def encode_latent_sample(sample: LatentSample) -> dict[str, bytes]:
    if sample.video.dtype != np.float16 or sample.reference.shape != sample.video.shape:
        raise SchemaError(f"latents of {sample.key!r}: float16 video and reference of one shape, got "
                          f"{sample.video.dtype} {sample.video.shape} and {sample.reference.shape}")
    return {"__key__": sample.key,
            "latents.npz": npz_bytes({"video": sample.video, "reference": sample.reference}),
            "latmeta.json": json_bytes(dict(sample.meta, latent_version=LATENT_VERSION))}


def decode_latent_sample(raw: dict[str, bytes]) -> LatentSample:
    key = raw.get("__key__")
    missing = [m for m in MEMBERS if m not in raw]
    if key is None or missing:
        raise SchemaError(f"latent sample {key!r} is missing {missing or ['__key__']}")
    try:
        meta = json.loads(raw["latmeta.json"])
        arrays = load_npz(raw["latents.npz"])
        video, reference = arrays["video"], arrays["reference"]
    except Exception as exc:  # noqa: BLE001 - any decoder failure means a corrupt member
        raise SchemaError(f"latent sample {key!r}: {type(exc).__name__}: {exc}") from exc
    if meta.get("latent_version") != LATENT_VERSION:
        raise SchemaError(f"latent sample {key!r} has version {meta.get('latent_version')}, "
                          f"reader expects {LATENT_VERSION}")
    return LatentSample(key, video, reference, meta)


def latent_frames(num_frames: int) -> int:
    """The most frames of the form 4k+1 in a segment of ``num_frames`` (what is encoded)."""
    if num_frames < 1:
        raise ValueError(f"a segment of {num_frames} frames has nothing to encode")
    return (num_frames - 1) // 4 * 4 + 1


def codec_id(config: dict, state_dict: dict) -> str:
    """16 hex digits of sha1 over the codec's config (without diffusers' ``_``-keys: one of them
    is a set listed in hash order) and every weight tensor (names, dtypes, shapes, bytes): the
    sidecar folder's name."""
    public = {k: v for k, v in config.items() if not k.startswith("_")}   # diffusers' bookkeeping
    h = hashlib.sha1(json.dumps(public, sort_keys=True, default=str).encode())
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(dtype=_bytes_dtype(t)).numpy().tobytes())
    return h.hexdigest()[:16]


def _bytes_dtype(t):
    import torch
    return torch.uint8 if t.element_size() == 1 else {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
