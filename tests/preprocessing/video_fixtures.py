"""Video files for ingestion tests, generated on the fly (nothing binary is committed)."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def _frame(i: int, w: int, h: int) -> np.ndarray:
    """Grey level encodes the frame index; a white marker sits in the top-left corner."""
    img = np.full((h, w, 3), (i * 10) % 250, np.uint8)
    img[: h // 4, : w // 4] = 255
    return img


def write(path: Path, n: int = 30, w: int = 64, h: int = 48, fps: int = 30, rotation: int = 0,
          pts_ms: list[int] | None = None, preset: str | None = None) -> Path:
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if preset:
            s.options = {"preset": preset}
        if pts_ms is not None:
            s.codec_context.time_base = Fraction(1, 1000)
        if rotation:
            s.set_display_rotation(rotation)
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(_frame(i, w, h), format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=16000)
        t = np.arange(16000) / 16000
        samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
        for k in range(0, 16000, 1024):
            f = av.AudioFrame.from_ndarray(samples[:, k:k + 1024], format="fltp", layout="mono")
            f.sample_rate = 16000
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def no_frames(path: Path) -> Path:
    """A valid container with a video stream that holds no frame (a fragmented mp4 writes its
    track header up front, so the stream exists with nothing in it)."""
    with av.open(str(path), "w", format="mp4", options={"movflags": "frag_keyframe+empty_moov"}) as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        c.start_encoding()
    return path


def make_all(d: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    out["zero_byte"] = d / "zero.mp4"
    out["zero_byte"].write_bytes(b"")
    good = write(d / "good.mp4", n=60)
    data = good.read_bytes()
    out["truncated"] = d / "truncated.mp4"
    out["truncated"].write_bytes(data[: len(data) * 2 // 5])
    out["text"] = d / "text.mp4"
    out["text"].write_text("this is not a video\n" * 20)
    out["audio_only"] = audio_only(d / "audio.m4a")
    out["no_frames"] = no_frames(d / "no_frames.mp4")
    out["rotated"] = write(d / "rotated.mp4", n=10, rotation=90)
    rng = np.random.default_rng(0)
    pts = np.concatenate([[0], np.cumsum(rng.choice([20, 33, 60], size=59))]).tolist()
    out["vfr"] = write(d / "vfr.mp4", n=60, pts_ms=pts)
    out["4k"] = write(d / "4k.mp4", n=4, w=3840, h=2160, preset="ultrafast")
    out["single_frame"] = write(d / "single.mp4", n=1)
    out["good"] = good
    return out
