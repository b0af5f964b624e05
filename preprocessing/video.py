"""Video files: H.264 encoding with PyAV."""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import Iterable

import av
import numpy as np


def write_video(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: float,
                crf: int = 18, pix_fmt: str = "yuv420p") -> Path:
    """Encode RGB uint8 frames (H, W, 3) to an H.264 mp4; odd sizes are padded.

    ``pix_fmt`` "yuv420p" plays everywhere; "yuv444p" (High 4:4:4) keeps full-resolution
    colour, which the synthetic corpus uses so that its frames stay close to the truth.

    Written to a temporary name and renamed, so a killed run leaves no half file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    container = av.open(str(tmp), mode="w")
    try:
        if encode_into(container, frames, fps, "libx264", pix_fmt, {"crf": str(crf)}, pad_even=True) == 0:
            raise ValueError("no frames to write")
    except BaseException:
        container.close()
        tmp.unlink(missing_ok=True)
        raise
    container.close()
    os.replace(tmp, path)
    return path


def encode_into(container, frames: Iterable[np.ndarray], fps: float, codec: str, pix_fmt: str,
                options: dict[str, str], pad_even: bool = False) -> int:
    """Encode RGB uint8 frames (H, W, 3; grey (H, W) is made RGB) as a new video stream of an
    open PyAV output ``container``, sized by the first frame; ``pad_even`` pads odd sizes by
    repeating the edge. Returns the number of frames written."""
    stream, count = None, 0
    for frame in frames:
        frame = np.ascontiguousarray(frame, dtype=np.uint8)
        if frame.ndim == 2:
            frame = np.repeat(frame[..., None], 3, -1)
        h, w = frame.shape[:2]
        if pad_even and (h % 2 or w % 2):
            frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        if stream is None:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height = frame.shape[1], frame.shape[0]
            stream.pix_fmt = pix_fmt
            stream.options = options
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
        count += 1
    if stream is not None:
        for packet in stream.encode():
            container.mux(packet)
    return count
