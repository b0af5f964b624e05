"""Video ingestion: probe any input and decode it lazily to constant frame rate.

Nothing here raises on bad input: :func:`probe` and :func:`open_video` return a status
(``ok`` or one of the failure kinds below) with a human-readable reason, plus notes about
what was done to a usable video (``rotated``, ``vfr_resampled``, ``downscaled``).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Iterator

import av
import numpy as np


class VideoStatus(str, Enum):
    OK = "ok"
    CORRUPT_CONTAINER = "corrupt_container"   # a known container that cannot be read/decoded
    NOT_A_VIDEO = "not_a_video"               # empty, or not any media container
    NO_VIDEO_STREAM = "no_video_stream"       # media, but no video stream (e.g. audio only)
    ZERO_DURATION = "zero_duration"           # a video stream without any decodable frame
    TOO_FEW_FRAMES = "too_few_frames"         # fewer frames than the caller needs


class Note(str, Enum):
    ROTATED = "rotated"                 # display-matrix rotation applied to the pixels
    VFR_RESAMPLED = "vfr_resampled"     # variable frame rate, resampled to constant
    DOWNSCALED = "downscaled"           # larger than max_side, scaled down while decoding
    FPS_RESAMPLED = "fps_resampled"     # constant rate converted to the target fps


# Magic numbers of common containers: a file that starts with one of these but will not open
# is a corrupt container; anything else that will not open is not a video.
_CONTAINER_MAGIC = (
    (4, b"ftyp"), (4, b"moov"), (4, b"mdat"), (4, b"free"), (4, b"wide"), (4, b"skip"),   # ISO BMFF
    (0, b"\x1a\x45\xdf\xa3"),            # Matroska / WebM
    (0, b"RIFF"),                        # AVI
    (0, b"FLV"), (0, b"OggS"), (0, b"\x00\x00\x01\xba"), (0, b"\x00\x00\x01\xb3"),
    (0, b"\x30\x26\xb2\x75"),            # ASF / WMV
)


@dataclass
class ProbeResult:
    path: str
    status: VideoStatus
    reason: str = ""
    notes: list[str] = field(default_factory=list)
    container: str | None = None
    streams: list[dict] = field(default_factory=list)
    codec: str | None = None
    width: int | None = None           # as stored (before rotation)
    height: int | None = None
    rotation: int = 0                  # degrees counter-clockwise to display upright
    average_fps: float | None = None   # frames / duration, as the container reports
    nominal_fps: float | None = None   # the stream's base (r_frame_rate); may be 0/0
    duration_s: float | None = None
    frame_count: int | None = None     # from the container, else estimated from the duration
    variable_frame_rate: bool = False

    @property
    def ok(self) -> bool:
        return self.status == VideoStatus.OK

    @property
    def display_size(self) -> tuple[int, int] | None:
        """(width, height) after rotation."""
        if self.width is None:
            return None
        return (self.height, self.width) if self.rotation % 180 else (self.width, self.height)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["status"] = self.status.value
        return d


def _rate(value) -> float | None:
    """A Fraction/None rate as float; 0/0 and 0 are None."""
    if value is None:
        return None
    try:
        f = float(value)
    except (ZeroDivisionError, ValueError, TypeError):
        return None
    return f if f > 0 and math.isfinite(f) else None


def _sniff(path: Path) -> bool:
    """True when the file starts like a known media container."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    return any(head[off:off + len(magic)] == magic for off, magic in _CONTAINER_MAGIC)


def probe(path: str | os.PathLike, min_frames: int = 1, scan_frames: int = 16) -> ProbeResult:
    """Describe a video file; never raises for bad input.

    Decodes the first frame (rotation; proof that it decodes) and reads the timestamps of up
    to ``scan_frames`` packets to tell a constant from a variable frame rate.
    """
    path = Path(path)
    result = ProbeResult(path=str(path), status=VideoStatus.OK)
    if not path.is_file():
        result.status, result.reason = VideoStatus.NOT_A_VIDEO, "no such file"
        return result
    if path.stat().st_size == 0:
        result.status, result.reason = VideoStatus.NOT_A_VIDEO, "empty file (0 bytes)"
        return result
    try:
        container = av.open(str(path))
    except Exception as exc:  # noqa: BLE001 - every failure becomes a status
        kind = VideoStatus.CORRUPT_CONTAINER if _sniff(path) else VideoStatus.NOT_A_VIDEO
        result.status, result.reason = kind, f"cannot open: {exc}"
        return result
    with container:
        result.container = container.format.name
        for s in container.streams:
            result.streams.append({"index": s.index, "type": s.type,
                                   "codec": s.codec_context.name if s.codec_context else None})
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            result.status = VideoStatus.NO_VIDEO_STREAM
            result.reason = f"no video stream (streams: {', '.join(kinds)})"
            return result
        stream = container.streams.video[0]
        cc = stream.codec_context
        result.codec, result.width, result.height = cc.name, cc.width, cc.height
        result.average_fps = _rate(stream.average_rate)
        result.nominal_fps = _rate(stream.base_rate) or _rate(stream.guessed_rate)
        if stream.duration is not None and stream.time_base is not None:
            result.duration_s = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            result.duration_s = container.duration / av.time_base
        result.frame_count = stream.frames or None
        # Timestamps from demuxed packets (cheap, no decoding) show whether the rate is
        # constant; only the first frame is decoded (rotation, and proof that it decodes).
        times, first = [], None
        try:
            for packet in container.demux(stream):
                if packet.pts is not None and packet.time_base is not None:
                    times.append(float(packet.pts * packet.time_base))
                if first is None:
                    for frame in packet.decode():
                        first = frame
                        result.rotation = int(round(frame.rotation or 0)) % 360
                        break
                if first is not None and len(times) >= scan_frames:
                    break
        except Exception as exc:  # noqa: BLE001
            if first is None:
                result.status, result.reason = VideoStatus.CORRUPT_CONTAINER, f"cannot decode: {exc}"
                return result
            result.notes.append(f"decode stopped early: {exc}")
        times.sort()
    if first is None:
        result.status, result.reason = VideoStatus.ZERO_DURATION, "the video stream has no decodable frame"
        return result
    if result.frame_count is None and result.duration_s and result.average_fps:
        result.frame_count = int(round(result.duration_s * result.average_fps))
    if result.frame_count is None:
        result.frame_count = len(times)
    if not result.duration_s and len(times) > 1:
        result.duration_s = times[-1] - times[0]
    result.variable_frame_rate = _is_vfr(times, result.average_fps, result.nominal_fps)
    if result.rotation:
        result.notes.append(Note.ROTATED.value)
    if result.variable_frame_rate:
        result.notes.append(Note.VFR_RESAMPLED.value)
    if result.frame_count < min_frames:
        result.status = VideoStatus.TOO_FEW_FRAMES
        result.reason = f"{result.frame_count} frame(s), need at least {min_frames}"
    return result


def _is_vfr(times: list[float], average: float | None, nominal: float | None) -> bool:
    if len(times) >= 3:
        d = np.diff(np.asarray(times))
        d = d[d > 0]
        if len(d) >= 2 and (d.max() - d.min()) > 0.25 * np.median(d):
            return True
    if average and nominal and abs(average - nominal) > 0.01 * nominal:
        return True
    return False


@dataclass
class DecodePlan:
    """What decoding will produce: CFR at ``fps``, frames of ``size`` (width, height)."""

    fps: float
    size: tuple[int, int]
    rotation: int
    num_frames: int
    notes: list[str]


@dataclass
class VideoReader:
    """A lazily decoded constant-frame-rate video. Iterate for (index, time_s, RGB frame)."""

    probe: ProbeResult
    plan: DecodePlan | None

    @property
    def status(self) -> VideoStatus:
        return self.probe.status

    def __iter__(self) -> Iterator[tuple[int, float, np.ndarray]]:
        if self.plan is None:
            return iter(())
        return _decode_cfr(Path(self.probe.path), self.plan)

    def read_all(self) -> np.ndarray:
        """All frames (T, H, W, 3) uint8: only for short clips."""
        frames = [f for _, _, f in self]
        return np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8)


def open_video(path: str | os.PathLike, target_fps: float | None = None,
               max_side: int | None = None, min_frames: int = 2) -> VideoReader:
    """Probe ``path`` and plan a CFR decode at ``target_fps`` (default: the video's own rate)
    with frames no larger than ``max_side`` (aspect kept, even sizes). Never raises for bad
    input: check ``reader.status``."""
    info = probe(path, min_frames=1)
    if not info.ok:
        return VideoReader(info, None)
    src_fps = info.average_fps or info.nominal_fps or 25.0
    # Keep the exact source rate (29.97 is 30000/1001); a VFR source gets its rounded mean rate.
    fps = float(target_fps or (src_fps if not info.variable_frame_rate else max(1, round(src_fps))))
    notes = list(info.notes)
    if target_fps and abs(target_fps - src_fps) > 1e-3 and not info.variable_frame_rate:
        notes.append(Note.FPS_RESAMPLED.value)
    w, h = info.display_size
    scale = 1.0
    if max_side and max(w, h) > max_side:
        scale = max_side / max(w, h)
        notes.append(Note.DOWNSCALED.value)
    out_w, out_h = max(2, int(round(w * scale / 2)) * 2), max(2, int(round(h * scale / 2)) * 2)
    duration = info.duration_s or (info.frame_count / src_fps)
    num = max(1, int(math.floor(duration * fps + 1e-6))) if duration else info.frame_count
    plan = DecodePlan(fps=fps, size=(out_w, out_h), rotation=info.rotation, num_frames=num, notes=notes)
    if num < min_frames:
        info.status = VideoStatus.TOO_FEW_FRAMES
        info.reason = f"{num} frame(s) at {fps:g} fps, need at least {min_frames}"
        return VideoReader(info, None)
    info.notes = notes
    return VideoReader(info, plan)


def _decode_cfr(path: Path, plan: DecodePlan) -> Iterator[tuple[int, float, np.ndarray]]:
    """Sample the source at t_k = k / fps (the frame shown at that time), scaled and rotated."""
    rot_k = (plan.rotation // 90) % 4
    # Scale before rotating: the stored frame's width/height are swapped for 90/270.
    sw, sh = (plan.size[1], plan.size[0]) if rot_k % 2 else plan.size
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        k = 0
        prev = None
        start = None
        try:
            for frame in container.decode(stream):
                t = frame.time if frame.time is not None else (k / plan.fps)
                if start is None:
                    start = t
                t -= start
                # Emit every output tick that falls before this frame's time with the previous frame.
                while prev is not None and k < plan.num_frames and k / plan.fps < t - 1e-9:
                    yield k, k / plan.fps, prev
                    k += 1
                if k >= plan.num_frames:
                    return
                img = frame.to_ndarray(format="rgb24", width=sw, height=sh,
                                       interpolation="AREA")
                prev = np.ascontiguousarray(np.rot90(img, rot_k)) if rot_k else img
        except Exception:  # noqa: BLE001 - a damaged tail ends the clip; what decoded is kept
            pass
        while prev is not None and k < plan.num_frames:
            yield k, k / plan.fps, prev
            k += 1
