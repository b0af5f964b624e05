"""The shard sample schema: the one definition that the shard writer and the training reader share.

One sample is one segment of one clip of one identity. In a WebDataset tar its members are
``<key>.<member>``; the key holds no dots (WebDataset splits on the first one).

=============  ==============================================================================
member         content
=============  ==============================================================================
rgb.mp4        aligned crop frames (T, H, W, 3) uint8; codec ``lossless`` (H.264 RGB, qp 0:
               decodes bit-exactly) or ``h264`` (yuv420p at a CRF: small, lossy)
cond.npz       ``normals`` (T, H, W, 3) uint8 (view-convention RGB, 0 = background),
               ``silhouette`` / ``face_mask`` (T, H, W) bool, optional ``depth`` (T, H, W)
               float16 metres (0 = background), ``valid`` (T, H, W) bool: crop pixels inside
               the source frame (outside: constant fill in the frames; since version 2)
smplx.npz      ``betas`` (300,), per frame ``expression`` (T, 100) and ``global_orient``,
               ``neck_pose``, ``head_pose``, ``jaw_pose``, ``leye_pose``, ``reye_pose``,
               ``transl`` (T, 3) axis-angle / metres; camera ``camera_K`` (T, 3, 3),
               ``camera_R`` (T, 3, 3), ``camera_t`` (T, 3) (OpenCV, pixels of the crop)
offsets.npz    ``dynamic_offsets`` Δf (T, N_face, 3) float16 (zero-mean over the whole clip),
               ``face_vertex_ids`` (N_face,) int32, ``static_offsets`` Δg (N, 3) float16
qc.json        per-frame ``status`` and residuals, clip-level summary
meta.json      provenance: schema version, clip / identity / split / segment, source path and
               sha1, fps, frame range, crop boxes, head-model sha1, licence tag, versions
=============  ==============================================================================

A reader may decode only the fields it needs (``decode_sample(raw, fields=...)``; see
:data:`FIELDS`): a generator's training step needs ``frames`` and ``normals``, and skipping
depth, masks and offsets halves the decode time per sample (``benchmarks/preprocess.py``).

Everything is numpy ``.npy`` inside zip (``allow_pickle=False`` on read) or JSON: no pickle.
Bytes are deterministic (fixed zip timestamps, sorted JSON keys), so the same sample always
encodes to the same bytes and shards can be compared by content hash.
"""
from __future__ import annotations

import io
import json
import re
import zipfile
from dataclasses import dataclass, field
from typing import Collection

import av
import numpy as np

from .video import encode_into

SCHEMA_VERSION = 2
#: versions the reader decodes (1: no ``valid`` mask, read as all True: crops were padded
#: with the frame's edge pixels then)
READABLE_VERSIONS = (1, 2)
MEMBERS = ("rgb.mp4", "cond.npz", "smplx.npz", "offsets.npz", "qc.json", "meta.json")
FRAME_CODECS = ("lossless", "h264")
SMPLX_PER_FRAME = ("expression", "global_orient", "neck_pose", "head_pose", "jaw_pose",
                   "leye_pose", "reye_pose", "transl", "camera_K", "camera_R", "camera_t")
#: field of :class:`ShardSample` -> the member that holds it (``meta`` is always decoded)
FIELDS = {"frames": "rgb.mp4", "normals": "cond.npz", "silhouette": "cond.npz",
          "face_mask": "cond.npz", "depth": "cond.npz", "valid": "cond.npz", "smplx": "smplx.npz",
          "dynamic_offsets": "offsets.npz", "face_vertex_ids": "offsets.npz",
          "static_offsets": "offsets.npz", "qc": "qc.json"}
_ZIP_DATE = (2020, 1, 1, 0, 0, 0)
_KEY_SAFE = re.compile(r"[^A-Za-z0-9_-]")


class SchemaError(ValueError):
    """A sample that does not follow the schema (missing member, wrong shape, bad bytes)."""


@dataclass
class ShardSample:
    """One sample. Decoded with a subset of :data:`FIELDS`, the fields not asked for are None."""

    key: str
    frames: np.ndarray | None                # (T, H, W, 3) uint8
    normals: np.ndarray | None               # (T, H, W, 3) uint8
    silhouette: np.ndarray | None            # (T, H, W) bool
    face_mask: np.ndarray | None             # (T, H, W) bool
    smplx: dict[str, np.ndarray] | None      # see the module docstring
    dynamic_offsets: np.ndarray | None       # (T, N_face, 3) float16
    face_vertex_ids: np.ndarray | None       # (N_face,) int32
    static_offsets: np.ndarray | None        # (N, 3) float16
    qc: dict | None = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    depth: np.ndarray | None = None          # (T, H, W) float16 (optional in the schema)
    valid: np.ndarray | None = None          # (T, H, W) bool; None when written: every pixel inside

    @property
    def num_frames(self) -> int:
        for arr in (self.frames, self.normals, self.silhouette, self.face_mask, self.depth, self.valid,
                    self.dynamic_offsets):
            if arr is not None:
                return int(arr.shape[0])
        return int(self.smplx["expression"].shape[0]) if self.smplx else 0

    def validate(self, partial: bool = False) -> "ShardSample":
        """Shapes and dtypes by the schema; ``partial``: fields that are None are skipped
        (a sample decoded with a subset of fields), else all but ``depth`` are required."""
        if not self.key or _KEY_SAFE.search(self.key):
            raise SchemaError(f"sample key {self.key!r} must be non-empty [A-Za-z0-9_-]")
        if not partial:
            absent = [f for f in FIELDS if f not in ("depth", "valid") and getattr(self, f) is None]
            if absent:
                raise SchemaError(f"sample {self.key!r} lacks {absent}")
        t = self.num_frames
        image = next((a for a in (self.frames, self.normals, self.silhouette, self.face_mask, self.depth,
                                  self.valid) if a is not None), None)
        h, w = image.shape[1:3] if image is not None else (None, None)
        for name, dtype, shape in (("frames", np.uint8, (t, h, w, 3)), ("normals", np.uint8, (t, h, w, 3)),
                                   ("silhouette", np.bool_, (t, h, w)), ("face_mask", np.bool_, (t, h, w)),
                                   ("depth", np.float16, (t, h, w)), ("valid", np.bool_, (t, h, w))):
            if getattr(self, name) is not None:
                _check(getattr(self, name), name, dtype, shape)
        if self.smplx is not None:
            for name in SMPLX_PER_FRAME:
                if name not in self.smplx:
                    raise SchemaError(f"smplx is missing {name!r}")
                if self.smplx[name].shape[0] != t:
                    raise SchemaError(f"smplx[{name!r}] has {self.smplx[name].shape[0]} frames, not {t}")
            if "betas" not in self.smplx or self.smplx["betas"].ndim != 1:
                raise SchemaError("smplx['betas'] must be one (num_betas,) vector per identity")
        if self.face_vertex_ids is not None:
            _check(self.face_vertex_ids, "face_vertex_ids", np.int32, (None,))
        if self.dynamic_offsets is not None:
            n_face = len(self.face_vertex_ids) if self.face_vertex_ids is not None else None
            _check(self.dynamic_offsets, "dynamic_offsets", np.float16, (t, n_face, 3))
        if self.static_offsets is not None:
            _check(self.static_offsets, "static_offsets", np.float16, (None, 3))
        return self


def safe_id(text: str) -> str:
    """``text`` with every character outside ``[A-Za-z0-9_-]`` replaced by ``_``."""
    return _KEY_SAFE.sub("_", text)


def sample_key(clip_id: str, segment: int) -> str:
    """``<safe clip id>_s<segment>``: no dots, stable."""
    return f"{safe_id(clip_id)}_s{segment:03d}"


def encode_sample(sample: ShardSample, frame_codec: str = "lossless", crf: int = 18,
                  fps: float = 25.0) -> dict[str, bytes]:
    """A sample -> ``{"__key__": key, member: bytes}`` for ``webdataset.TarWriter``."""
    sample.validate()
    valid = sample.valid if sample.valid is not None else np.ones(sample.silhouette.shape, bool)
    cond = {"normals": sample.normals, "silhouette": sample.silhouette, "face_mask": sample.face_mask,
            "valid": valid}
    if sample.depth is not None:
        cond["depth"] = sample.depth
    meta = dict(sample.meta, schema_version=SCHEMA_VERSION, frame_codec=frame_codec)
    return {
        "__key__": sample.key,
        "rgb.mp4": encode_frames(sample.frames, frame_codec, crf, fps),
        "cond.npz": npz_bytes(cond),
        "smplx.npz": npz_bytes(sample.smplx),
        "offsets.npz": npz_bytes({"dynamic_offsets": sample.dynamic_offsets,
                                  "face_vertex_ids": sample.face_vertex_ids,
                                  "static_offsets": sample.static_offsets}),
        "qc.json": json_bytes(sample.qc),
        "meta.json": json_bytes(meta),
    }


def decode_sample(raw: dict[str, bytes], fields: Collection[str] | None = None,
                  max_frames: int | None = None) -> ShardSample:
    """WebDataset raw sample (``__key__`` + member bytes) -> :class:`ShardSample`.

    ``fields``: the :data:`FIELDS` to decode (default all); the others stay None and their
    members are not decoded. ``max_frames``: keep only the first frames of every per-frame field
    (the video stops decoding there; a training window at frame 0 needs no more). Raises
    :class:`SchemaError` for a missing member, an unknown field or undecodable bytes."""
    key = raw.get("__key__")
    missing = [m for m in MEMBERS if m not in raw]
    if key is None or missing:
        raise SchemaError(f"sample {key!r} is missing {missing or ['__key__']}")
    wanted = set(FIELDS) if fields is None else set(fields)
    if wanted - set(FIELDS):
        raise SchemaError(f"unknown field(s) {sorted(wanted - set(FIELDS))}; known: {list(FIELDS)}")
    try:
        meta = json.loads(raw["meta.json"])
        version = meta.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise SchemaError(f"sample {key!r} has schema version {version}, reader decodes {READABLE_VERSIONS}")
        arrays: dict = {}
        for member in ("cond.npz", "offsets.npz"):
            names = [f for f in wanted if FIELDS[f] == member]
            if member == "cond.npz" and "valid" in names and version == 1:
                names.append("silhouette")                    # its shape for the all-True mask
            if names:
                arrays.update(load_npz(raw[member], names))
        if "valid" in wanted and version == 1:
            arrays["valid"] = np.ones(arrays["silhouette"].shape, bool)
            if "silhouette" not in wanted:
                del arrays["silhouette"]
        sample = ShardSample(
            key=key, frames=decode_frames(raw["rgb.mp4"], max_frames) if "frames" in wanted else None,
            normals=arrays.get("normals"), silhouette=arrays.get("silhouette"),
            face_mask=arrays.get("face_mask"), depth=arrays.get("depth"), valid=arrays.get("valid"),
            smplx=load_npz(raw["smplx.npz"]) if "smplx" in wanted else None,
            dynamic_offsets=arrays.get("dynamic_offsets"), face_vertex_ids=arrays.get("face_vertex_ids"),
            static_offsets=arrays.get("static_offsets"),
            qc=json.loads(raw["qc.json"]) if "qc" in wanted else None, meta=meta)
        for name in wanted - {"depth", "frames", "smplx", "qc"}:
            if getattr(sample, name) is None:
                raise SchemaError(f"{FIELDS[name]} has no {name!r}")
        if max_frames is not None:
            _keep_first_frames(sample, max_frames)
    except SchemaError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure means a corrupt member
        raise SchemaError(f"sample {key!r}: {type(exc).__name__}: {exc}") from exc
    return sample.validate(partial=True)


def _keep_first_frames(sample: ShardSample, count: int) -> None:
    """Cut every per-frame field of ``sample`` to its first ``count`` frames (in place)."""
    for name in ("normals", "silhouette", "face_mask", "depth", "valid", "dynamic_offsets"):
        if getattr(sample, name) is not None:
            setattr(sample, name, getattr(sample, name)[:count])
    if sample.smplx is not None:
        sample.smplx = {k: (v[:count] if k in SMPLX_PER_FRAME else v) for k, v in sample.smplx.items()}


# -- member codecs -------------------------------------------------------------------------

def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Deterministic ``.npz`` (zip of ``.npy``; fixed timestamps, sorted names, deflated)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for name in sorted(arrays):
            arr = np.ascontiguousarray(arrays[name])
            if arr.dtype == object:
                raise SchemaError(f"{name!r} is an object array: the schema holds no pickle")
            npy = io.BytesIO()
            np.lib.format.write_array(npy, arr, allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, npy.getvalue())
    return buf.getvalue()


def load_npz(data: bytes, names: Collection[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` (only ``names`` that it holds, when given: the others are
    not decompressed)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files if names is None or k in names}


def json_bytes(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default).encode()


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def encode_frames(frames: np.ndarray, codec: str = "lossless", crf: int = 18, fps: float = 25.0) -> bytes:
    """RGB uint8 frames -> mp4 bytes. ``lossless`` (libx264rgb, qp 0) decodes bit-exactly;
    ``h264`` is yuv420p at ``crf``. Single-threaded encode: the bytes are reproducible."""
    if codec not in FRAME_CODECS:
        raise SchemaError(f"frame codec {codec!r}: use one of {FRAME_CODECS}")
    h, w = frames.shape[1:3]
    if codec == "h264" and (h % 2 or w % 2):
        raise SchemaError(f"h264 needs even frame sizes, got {w}x{h}")
    name, pix_fmt = ("libx264rgb", "rgb24") if codec == "lossless" else ("libx264", "yuv420p")
    # lossless at preset ultrafast (CAVLC, no deblocking): decodes 1.8x faster than at
    # veryfast for ~12 % more bytes (measured on 24 frames at 256^2: 39 vs 69 ms)
    opts = {"qp": "0", "preset": "ultrafast"} if codec == "lossless" else {"crf": str(crf), "preset": "medium"}
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        encode_into(container, frames, fps, name, pix_fmt, dict(opts, threads="1"))
    return buf.getvalue()


def decode_frames(data: bytes, max_frames: int | None = None) -> np.ndarray:
    """mp4 bytes -> (T, H, W, 3) uint8 RGB (only the first ``max_frames``, when given: decoding
    stops there). Lossless frames decode to planar RGB (gbrp), which PyAV returns in RGB order
    without a colour conversion (half the decode time)."""
    frames = []
    with av.open(io.BytesIO(data)) as container:
        for f in container.decode(video=0):
            if max_frames is not None and len(frames) >= max_frames:
                break
            frames.append(f.to_ndarray() if f.format.name == "gbrp" else f.to_ndarray(format="rgb24"))
    if not frames:
        raise SchemaError("rgb.mp4 holds no frame")
    return np.stack(frames)


def _check(arr, name: str, dtype, shape: tuple) -> None:
    if not isinstance(arr, np.ndarray):
        raise SchemaError(f"{name} must be a numpy array, got {type(arr).__name__}")
    if arr.dtype != dtype:
        raise SchemaError(f"{name} has dtype {arr.dtype}, schema says {np.dtype(dtype)}")
    if arr.ndim != len(shape) or any(s is not None and a != s for a, s in zip(arr.shape, shape)):
        raise SchemaError(f"{name} has shape {arr.shape}, schema says {shape}")
