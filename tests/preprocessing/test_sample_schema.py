"""The shard sample schema: bit-exact round trips, reproducible bytes, clear errors."""
import numpy as np
import pytest
from sample_factory import random_sample

from preprocessing.sample_schema import (FIELDS, MEMBERS, SchemaError, decode_sample, encode_sample,
                                         npz_bytes, sample_key)


def _assert_same(a, b):
    assert a.key == b.key
    for name in ("frames", "normals", "silhouette", "face_mask", "depth", "dynamic_offsets",
                 "face_vertex_ids", "static_offsets"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name
    assert a.smplx.keys() == b.smplx.keys()
    for k in a.smplx:
        assert np.array_equal(a.smplx[k], b.smplx[k]), k
    assert a.qc == b.qc


def test_lossless_round_trip_is_bit_exact_and_bytes_reproducible():
    sample = random_sample(frames=5, size=34)         # even random noise survives exactly
    raw = encode_sample(sample)
    assert set(raw) == {"__key__", *MEMBERS}
    back = decode_sample(raw)
    _assert_same(sample, back)
    assert back.meta["schema_version"] == 2 and back.meta["frame_codec"] == "lossless"
    again = encode_sample(random_sample(frames=5, size=34))
    assert again == raw                                # same sample -> same bytes


def test_h264_codec_is_lossy_but_close_and_smaller():
    sample = random_sample(frames=4, size=32)
    sample.frames[:] = np.linspace(0, 255, 32, dtype=np.uint8)[None, None, :, None]
    lossless, lossy = encode_sample(sample), encode_sample(sample, frame_codec="h264", crf=10)
    back = decode_sample(lossy)
    assert back.meta["frame_codec"] == "h264"
    assert np.abs(back.frames.astype(int) - sample.frames).mean() < 3
    assert len(lossy["rgb.mp4"]) < len(lossless["rgb.mp4"])


def test_optional_depth():
    back = decode_sample(encode_sample(random_sample(depth=False)))
    assert back.depth is None


def test_validation_names_the_problem():
    s = random_sample()
    s.key = "clip.with.dots"
    with pytest.raises(SchemaError, match="key"):
        encode_sample(s)
    s = random_sample()
    s.normals = s.normals.astype(np.float32)
    with pytest.raises(SchemaError, match="normals has dtype float32"):
        encode_sample(s)
    s = random_sample()
    del s.smplx["jaw_pose"]
    with pytest.raises(SchemaError, match="jaw_pose"):
        encode_sample(s)
    with pytest.raises(SchemaError, match="object array"):
        npz_bytes({"x": np.array([{"a": 1}], dtype=object)})


def test_decode_rejects_missing_and_corrupt_members():
    raw = encode_sample(random_sample())
    with pytest.raises(SchemaError, match="missing"):
        decode_sample({k: v for k, v in raw.items() if k != "offsets.npz"})
    with pytest.raises(SchemaError, match="cond.npz|BadZipFile|Error"):
        decode_sample(dict(raw, **{"cond.npz": raw["cond.npz"][:100]}))
    with pytest.raises(SchemaError):
        decode_sample(dict(raw, **{"rgb.mp4": b"\x00" * 64}))
    with pytest.raises(SchemaError, match="schema version"):
        decode_sample(dict(raw, **{"meta.json": b'{"schema_version": 99}'}))


def test_decoding_a_subset_of_fields():
    sample = random_sample(frames=4, size=32)
    raw = encode_sample(sample)
    part = decode_sample(raw, fields=("frames", "normals"))
    assert np.array_equal(part.frames, sample.frames) and np.array_equal(part.normals, sample.normals)
    assert all(getattr(part, f) is None for f in FIELDS if f not in ("frames", "normals"))
    assert part.meta["schema_version"] == 2 and part.num_frames == 4
    only_offsets = decode_sample(raw, fields=("dynamic_offsets",))
    assert np.array_equal(only_offsets.dynamic_offsets, sample.dynamic_offsets)
    assert only_offsets.num_frames == 4
    with pytest.raises(SchemaError, match="unknown field"):
        decode_sample(raw, fields=("frames", "rgb"))
    # fields not asked for are not read: a cond.npz holding only normals still gives frames
    # and normals; asking for a field the member lacks is an error
    no_depth = dict(raw, **{"cond.npz": npz_bytes({"normals": sample.normals})})
    assert decode_sample(no_depth, fields=("frames", "normals")).depth is None
    with pytest.raises(SchemaError, match="face_mask"):
        decode_sample(no_depth, fields=("face_mask",))
    with pytest.raises(SchemaError, match="lacks"):              # the writer needs every field
        encode_sample(part)


def test_sample_key_is_dot_free_and_stable():
    assert sample_key("a.b/c d", 3) == "a_b_c_d_s003"


def test_validity_mask_round_trips_and_version_1_reads_as_all_valid():
    sample = random_sample(frames=3, size=16)
    sample.valid = np.ones((3, 16, 16), bool)
    sample.valid[:, :, :5] = False                    # a face at the left border of its frame
    back = decode_sample(encode_sample(sample))
    assert back.valid.dtype == np.bool_ and np.array_equal(back.valid, sample.valid)
    only = decode_sample(encode_sample(sample), fields=("valid",))
    assert np.array_equal(only.valid, sample.valid) and only.silhouette is None
    # a version-1 sample (written before the mask existed): all True, same shape
    import io
    import json
    import zipfile
    raw = encode_sample(random_sample(frames=3, size=16))
    meta = json.loads(raw["meta.json"])
    meta["schema_version"] = 1
    cond = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw["cond.npz"])) as src, zipfile.ZipFile(cond, "w") as dst:
        for name in src.namelist():
            if name != "valid.npy":
                dst.writestr(name, src.read(name))
    old = dict(raw, **{"meta.json": json.dumps(meta).encode(), "cond.npz": cond.getvalue()})
    v1 = decode_sample(old, fields=("valid", "normals"))
    assert v1.valid.shape == (3, 16, 16) and v1.valid.all() and v1.silhouette is None
