"""Plain records of the preprocessing job: what travels between its tasks and into the
manifest. Only numpy and pydantic here, so a process that merely moves records stays light
to start."""
from __future__ import annotations

import copy
import errno
import re
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator


#: frame codecs of the shard schema (``preprocessing.sample_schema.FRAME_CODECS`` checks the same)
FrameCodec = Literal["lossless", "h264"]
_STRICT = ConfigDict(extra="forbid", strict=True, validate_default=True)


class StageConfig(BaseModel):
    """Everything a worker needs to process clips: validated once in the driver (unknown keys,
    wrong types, out-of-range values and unknown codecs are errors naming the key), then
    plain data that travels to the Ray workers."""

    model_config = _STRICT

    fps: Annotated[float, Field(gt=0, le=240)] | None = 25.0   # decode rate (None: the source's)
    max_side: Annotated[int, Field(ge=64)] = 720          # decode size cap (long side)
    min_frames: Annotated[int, Field(ge=1)] = 8
    max_frames: Annotated[int, Field(ge=1)] | None = 300  # longer clips are cut (first frames kept)
    crop_size: Annotated[int, Field(ge=32, le=4096)] = 256
    fov_deg: Annotated[float, Field(gt=1, lt=179)] = 20.0  # assumed vertical FOV of real footage
    # where the tracker's 68 points lie on the model: "auto" (the calibrated embedding made for
    # this model, if shipped; see preprocessing/landmark_calibration.py), "none" (the model's own
    # iBUG-68 definitions) or an embedding file
    landmark_embedding: str = "auto"
    segment_frames: Annotated[int, Field(ge=1)] = 24      # frames per shard sample
    max_bad_frames: Annotated[float, Field(ge=0, le=1)] = 0.5   # more frames not ok: the clip fails
    render_depth: bool = True
    frame_codec: FrameCodec = "lossless"
    frame_crf: Annotated[int, Field(ge=0, le=51)] = 18
    licence: str = "unknown"
    fit: dict[str, Any] = Field(default_factory=dict)     # FitConfig overrides (checked by name and type)
    estimator: Annotated[str, Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")] | None = None
    #                                   "package.module:factory" (see preprocessing/estimators.py)
    estimator_weights: str | None = None

    @field_validator("fit")
    @classmethod
    def _fit_overrides(cls, value: dict[str, Any]) -> dict[str, Any]:
        """The overrides must name fields of :class:`preprocessing.fitting.FitConfig` with
        values of their type and range; they stay the overrides given (the shard fingerprint
        covers what the user set)."""
        fit_options_model().model_validate(value)
        return value

    @model_validator(mode="after")
    def _frames(self) -> "StageConfig":
        if self.max_frames is not None and self.max_frames < self.min_frames:
            raise ValueError(f"max_frames ({self.max_frames}) is below min_frames ({self.min_frames})")
        return self


@lru_cache(maxsize=1)
def fit_options_model() -> type[BaseModel]:
    """A strict pydantic model of :class:`FitConfig`'s fields (names, types, non-negative
    numbers, defaults), generated so the field list has one definition. ``fov_deg`` is not
    among them: the stage's ``fov_deg`` sets it."""
    import dataclasses
    import typing

    from .fitting import FitConfig

    hints = typing.get_type_hints(FitConfig)
    spec = {}
    for f in dataclasses.fields(FitConfig):
        if f.name == "fov_deg":
            continue
        kind = hints[f.name]
        if kind in (int, float):
            kind = Annotated[kind, Field(ge=0)]
        spec[f.name] = (kind, f.default)
    return create_model("FitOptions", __config__=_STRICT, **spec)


@dataclass
class ClipItem:
    clip_id: str
    path: str
    identity_id: str
    split: str = "train"


@dataclass
class IdentityFit:
    identity_id: str
    status: str                       # ok or the anchor failures' status
    reason: str = ""
    anchor_clip_id: str | None = None
    betas: np.ndarray | None = None            # (300,)
    static_offsets: np.ndarray | None = None   # (N, 3) float32
    seconds: float = 0.0
    clip_failures: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # id: (status, stage, reason)


@dataclass
class ClipOutcome:
    clip_id: str
    identity_id: str
    split: str
    path: str
    status: str                       # ok, or why the clip produced no sample
    stage: str = ""                   # where it failed
    reason: str = ""
    frames: int = 0
    notes: list[str] = field(default_factory=list)
    samples: list[dict[str, bytes]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)   # per stage
    attempts: int = 1                 # runs of the stages (a stage that raised is retried)
    qc: dict = field(default_factory=dict)
    node: str = ""                    # where it ran (filled in by the job driver's task)
    started_at: float = 0.0           # wall clock (epoch seconds) on that node
    finished_at: float = 0.0
    error_type: str = ""              # the exception's class name for stage_error / worker_lost
    transient: bool = False           # the failure may pass when tried again (not in the row)
    fit: object = None                # the anchor clip's FitResult while in its worker (not in the row)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def row(self) -> dict:
        """The manifest row (everything but the sample bytes)."""
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)
             if f.name not in ("samples", "fit", "transient")}
        d["samples"] = len(self.samples)
        return d


def identity_failure_outcome(item: ClipItem, identity: IdentityFit) -> ClipOutcome:
    """The row of a clip whose identity could not be fitted (no work to do): the identity's
    failure, or this clip's own if it was one of the anchor candidates that failed."""
    out = ClipOutcome(item.clip_id, item.identity_id, item.split, item.path, status="identity_failed",
                      stage="identity", reason=identity.reason)
    if item.clip_id in identity.clip_failures:
        out.status, out.stage, out.reason = identity.clip_failures[item.clip_id]
    return out


# -- failure classes ----------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
#: OSError numbers that say a failure may go away when tried again
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ESTALE,
                              errno.ECONNRESET, errno.ECONNABORTED, errno.EINTR})


def one_line(exc: BaseException | str, limit: int = 500) -> str:
    """``Type: message`` on one line, without terminal colour codes (a manifest ``reason``)."""
    text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return " ".join(_ANSI.sub("", text).split())[:limit]


#: OSError numbers of a machine fault, not the input's (disk full, read-only, no permission)
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def is_environment_fault(exc: BaseException) -> bool:
    """A disk, filesystem or permission fault: the job stops (exit 3) rather than record rows."""
    return isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS


def is_transient(exc: BaseException) -> bool:
    """Connection resets, timeouts and I/O errors that come and go: worth a retry in place.
    Anything else a stage raises is deterministic for its input and is not retried."""
    if isinstance(exc, (ConnectionError, TimeoutError, InterruptedError, BlockingIOError)):
        return True
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS
