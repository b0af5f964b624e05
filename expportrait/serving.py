"""The registered model's pyfunc: data in, data out, one request's settings for that request only.

    input   DataFrame, one row per request: ``source`` (base64 image or video bytes: the portrait,
            its first frame is used), ``driving`` (base64 video bytes)
    params  (ParamSchema, for that call only) ``steps`` (0: the package's), ``seed`` (-1: the
            package's), ``guidance`` (-1: the package's)
    output  ``video`` (base64 mp4 bytes, empty unless ok), ``status`` (``ok``, ``bad_input``,
            ``too_large``, or the subject's status such as ``no_face``), ``message`` (ok: JSON
            of the settings used, the frame count and rate; else what was wrong, naming the column)

No client-supplied path is ever opened or written: the bytes are decoded into a private
temporary folder (``mkdtemp``, mode 0700) removed after the row; a value that is not base64 of an
image or a video (a path such as ``/etc/passwd`` or ``../x.mp4`` included) is ``bad_input``
before anything is read. Decoded inputs are bounded (:data:`LIMITS`: bytes, pixels, frames).
Every driving frame comes back at the driving frame rate: the generator runs as trained (the
stage spec's frame rate, every ``frame_stride``-th frame) and :func:`resample_frames` puts its
frames back on the driving clip's timeline. The shared settings are never mutated
(:meth:`Reenactor.with_settings` makes each call's copy).

Logged from code (``expportrait/model_code.py`` calls ``mlflow.models.set_model``): nothing is
pickled; the project's packages travel as the model's ``code_paths``.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import mlflow
import pandas as pd

INPUT_COLUMNS = ("source", "driving")
OUTPUT_COLUMNS = ["video", "status", "message"]
#: bounds on what one request may make the server decode
LIMITS = {"bytes": 64 * 2**20, "pixels": 3840 * 2160, "frames": 600, "steps": 100}
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM")


class BadInput(ValueError):
    """A request the model refuses before any work; ``status`` says why (``bad_input``, ``too_large``)."""

    def __init__(self, message: str, status: str = "bad_input") -> None:
        super().__init__(message)
        self.status = status


class ExpPortraitModel(mlflow.pyfunc.PythonModel):
    """Reenactment as a pyfunc (module doc)."""

    def load_context(self, context) -> None:
        from expportrait.reenactment import Reenactor
        self.reenactor = Reenactor.from_package(context.artifacts["package"],
                                                device=os.environ.get("EXPPORTRAIT_DEVICE"))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        try:
            overrides = call_settings(params or {})
        except BadInput as exc:
            return pd.DataFrame([{"video": "", "status": exc.status, "message": str(exc)}] * len(model_input),
                                columns=OUTPUT_COLUMNS)
        rows = [reenact_bytes(self.reenactor, row, overrides) for row in model_input.to_dict("records")]
        return pd.DataFrame(rows, columns=OUTPUT_COLUMNS)


def call_settings(params: dict) -> dict:
    """This call's setting overrides from the request's params (sentinels: the package's)."""
    steps, seed, guidance = int(params.get("steps", 0) or 0), int(params.get("seed", -1)), params.get("guidance")
    if not 0 <= steps <= LIMITS["steps"]:
        raise BadInput(f"param steps = {steps}: must be in 1..{LIMITS['steps']} (0: the package's)")
    guidance = None if guidance is None or float(guidance) < 0 else float(guidance)
    return {"steps": steps or None, "seed": seed if seed >= 0 else None, "guidance": guidance}


def decode_column(row: dict, column: str, folder: Path) -> tuple[Path, int, float]:
    """The base64 bytes of ``row[column]`` written into ``folder`` (a file the model names), with
    its frame count and rate (:func:`check_media`); :class:`BadInput` naming the column for
    anything else (a path is never opened)."""
    value = row.get(column)
    if not isinstance(value, str) or not value:
        raise BadInput(f"column {column!r}: missing (base64 image or video bytes expected)")
    if len(value) > LIMITS["bytes"] * 4 // 3 + 4:
        raise BadInput(f"column {column!r}: over {LIMITS['bytes'] // 2**20} MiB", "too_large")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(f"column {column!r}: not base64 bytes (a file path or URL is never read: send the "
                       f"image or video itself, base64-encoded)") from None
    is_image = data.startswith(_IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")
    if column == "driving" and is_image:
        raise BadInput("column 'driving': an image; a driving video is expected")
    path = folder / (column + (".png" if is_image else ".mp4"))
    path.write_bytes(data)
    return (path, *check_media(path, column, is_image))


def check_media(path: Path, column: str, is_image: bool) -> tuple[int, float]:
    """(frames, fps) of a decoded input within :data:`LIMITS`; :class:`BadInput` otherwise."""
    import av
    if is_image:
        import cv2
        import numpy as np
        image = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise BadInput(f"column {column!r}: not a readable image")
        if image.shape[0] * image.shape[1] > LIMITS["pixels"]:
            raise BadInput(f"column {column!r}: {image.shape[1]}x{image.shape[0]} is over {LIMITS['pixels']} "
                           f"pixels", "too_large")
        return 1, 0.0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BadInput(f"column {column!r}: no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if width * height > LIMITS["pixels"]:
                raise BadInput(f"column {column!r}: {width}x{height} is over {LIMITS['pixels']} pixels", "too_large")
            fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
            frames = 0
            for packet in container.demux(stream):
                frames += packet.size > 0
                if frames > LIMITS["frames"]:
                    raise BadInput(f"column {column!r}: over {LIMITS['frames']} frames", "too_large")
    except av.error.FFmpegError as exc:
        raise BadInput(f"column {column!r}: not a readable image or video ({type(exc).__name__})") from None
    if not frames:
        raise BadInput(f"column {column!r}: no frames")
    return frames, fps


def reenact_bytes(reenactor, row: dict, overrides: dict) -> dict:
    """One request row (module doc) on a copy of the settings; never raises for a bad input."""
    from expportrait.reenactment import SubjectError, resample_frames
    from preprocessing.video import write_video
    folder = Path(tempfile.mkdtemp(prefix="expportrait_request_"))   # 0700, ours alone
    t0 = time.perf_counter()
    try:
        source = decode_column(row, "source", folder)[0]
        driving, frames_in, fps_in = decode_column(row, "driving", folder)
        call = reenactor.with_settings(**overrides)
        src = call.subject(source, max_frames=1)
        drv = call.driving_subject(driving)
        res = call.reenact(src, drv)
        frames = resample_frames(res.frames, drv.fps, frames_in, fps_in)
        out = write_video(folder / "out.mp4", frames, fps_in)
        st = call.settings
        used = {"steps": st.steps, "seed": st.seed, "guidance": st.guidance, "frame_stride": st.frame_stride,
                "frames": int(len(frames)), "fps": fps_in, "generated_frames": int(len(res.frames)),
                "seconds": round(time.perf_counter() - t0, 3)}
        return {"video": base64.b64encode(Path(out).read_bytes()).decode(), "status": "ok",
                "message": json.dumps(used)}
    except BadInput as exc:
        return {"video": "", "status": exc.status, "message": str(exc)}
    except SubjectError as exc:
        return {"video": "", "status": exc.status, "message": f"{type(exc).__name__}: {exc}".replace(str(folder), "")}
    except ValueError as exc:
        return {"video": "", "status": "failed", "message": f"{type(exc).__name__}: {exc}".replace(str(folder), "")}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def signature():
    """Strings in (base64), strings out; the per-call params."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema
    return ModelSignature(inputs=Schema([ColSpec("string", c) for c in INPUT_COLUMNS]),
                          outputs=Schema([ColSpec("string", c) for c in OUTPUT_COLUMNS]),
                          params=ParamSchema([ParamSpec("steps", "long", 0), ParamSpec("seed", "long", -1),
                                              ParamSpec("guidance", "double", -1.0)]))
