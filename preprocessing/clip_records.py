"""Plain records of the preprocessing job: what travels between its tasks and into the
manifest. Only numpy here, so a process that merely moves records (the shard writer) stays
light to start."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields

import numpy as np


@dataclass
class StageConfig:
    """Everything a worker needs to process clips; plain data (travels to Ray workers)."""

    fps: float | None = 25.0          # decode rate (None: the source's own)
    max_side: int = 720               # decode size cap (long side)
    min_frames: int = 8
    max_frames: int | None = 300      # longer clips are cut (first frames kept)
    crop_size: int = 256
    fov_deg: float = 20.0             # assumed vertical FOV of real footage
    segment_frames: int = 24          # frames per shard sample (shorter clips: one sample)
    max_bad_frames: float = 0.5       # more frames not ok than this: the clip fails
    render_depth: bool = True
    frame_codec: str = "lossless"
    frame_crf: int = 18
    licence: str = "unknown"
    fit: dict = field(default_factory=dict)   # FitConfig overrides
    estimator: str | None = None      # "package.module:factory" (see preprocessing/estimators.py)
    estimator_weights: str | None = None


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
    fit: object = None                # transient: the anchor clip's FitResult (not serialised)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def row(self) -> dict:
        """The manifest row (everything but the sample bytes)."""
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)
             if f.name not in ("samples", "fit")}
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
