"""The per-clip stages of the preprocessing job, as plain functions (no Ray, no shard I/O).

``decode -> track + landmarks -> fit -> render conditions -> segment into schema samples``;
:func:`fit_identity` gives the β and Δg that all clips of one identity share. The Ray driver
(``pipelines/preprocess.py``) and the benchmark's bare loop call exactly these functions.

A clip never raises out of :func:`process_clip`: failures come back as a :class:`ClipOutcome`
with a status, the stage that failed and a reason.
"""
from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from models.render.conditions import render_conditions

from .clip_fit import ClipFit, fit_frames
from .files import file_digest
from .fitting import FitConfig, Fitter
from .ingest import open_video
from .clip_records import (ClipItem, ClipOutcome, IdentityFit, StageConfig, identity_failure_outcome,
                           is_transient, one_line)
from .sample_schema import ShardSample, encode_sample, sample_key
from .tracking import FaceTracker


class StageContext:
    """What one worker process loads once: the head model, tracker, fitter, estimator."""

    def __init__(self, model_path: str | Path, config: StageConfig, subdivision: int = 1,
                 model_sha1: str | None = None) -> None:
        from models.head.smplx_file import load_smplx_model
        from .estimators import load_estimator

        self.config = config
        self.model_path = str(model_path)
        self.model_sha1 = model_sha1 or file_digest(model_path)   # the job passes the one it hashed
        from .landmark_embedding import head_with_embedding

        self.head, self.landmark_embedding = head_with_embedding(load_smplx_model(model_path),
                                                                 config.landmark_embedding, subdivision)
        self.tracker = FaceTracker(crop_size=config.crop_size)
        self.fitter = Fitter(self.head, FitConfig(**{**config.fit, "fov_deg": config.fov_deg}),
                             landmark_weights=self.landmark_embedding.weights() if self.landmark_embedding else None)
        self.estimator = (load_estimator(config.estimator, config.estimator_weights)
                          if config.estimator else None)
        self.provenance = provenance(self.model_sha1, config.licence)


class StageFailure(Exception):
    def __init__(self, status: str, stage: str, reason: str) -> None:
        super().__init__(f"{stage}: {status}: {reason}")
        self.status, self.stage, self.reason = status, stage, reason


def decode_clip(item: ClipItem, config: StageConfig) -> tuple[np.ndarray, float, list[str]]:
    """Frames (T, H, W, 3) at constant rate, the rate, ingest notes; StageFailure if unusable."""
    reader = open_video(item.path, target_fps=config.fps, max_side=config.max_side,
                        min_frames=config.min_frames)
    if reader.plan is None:
        raise StageFailure(reader.status.value, "decode", reader.probe.reason)
    frames = []
    for k, _, frame in reader:
        if config.max_frames and k >= config.max_frames:
            break
        frames.append(frame)
    if len(frames) < config.min_frames:
        raise StageFailure("too_few_frames", "decode",
                           f"{len(frames)} decodable frame(s), need {config.min_frames}")
    notes = list(reader.plan.notes) + (["truncated"] if reader.plan.num_frames > len(frames) else [])
    return np.stack(frames), reader.plan.fps, notes


def _fit(frames: np.ndarray, ctx: StageContext, betas=None, static=None) -> ClipFit:
    return fit_frames(frames, ctx.head, ctx.tracker, fov_deg=ctx.config.fov_deg, fitter=ctx.fitter,
                      estimator=ctx.estimator, betas=betas, static_offsets=static)


def _bad_fraction(clip: ClipFit) -> float:
    statuses = clip.fit.frame_status
    return 1.0 - statuses.count("ok") / max(1, len(statuses))


def fit_identity(identity_id: str, items: list[ClipItem], ctx: StageContext,
                 run: Callable[[ClipItem], ClipOutcome] | None = None
                 ) -> tuple[IdentityFit, dict[str, ClipOutcome]]:
    """β and Δg of an identity from its first usable clip (in the order given).

    That anchor clip is fitted whole with β and Δg free, so its fit *is* the identity's and
    its outcome is final; every other clip of the identity is fitted with them fixed. Returns
    the identity and the outcomes of the clips it tried (failed ones and the anchor), which
    need no second pass. Never raises: a failed identity says why. ``run`` (default
    :func:`run_clip`) lets the job wrap each attempt (retries in place, fault injection)."""
    t0 = time.perf_counter()
    run = run or (lambda item: run_clip(item, ctx))
    tried: dict[str, ClipOutcome] = {}
    for item in items:
        out = run(item)
        tried[item.clip_id] = out
        if out.ok:
            fit = out.fit
            out.fit = None
            return IdentityFit(identity_id, "ok", anchor_clip_id=item.clip_id,
                               betas=fit.params.betas.reshape(-1).numpy().astype(np.float32),
                               static_offsets=fit.static_offsets.numpy().astype(np.float32),
                               seconds=time.perf_counter() - t0,
                               clip_failures={c: (o.status, o.stage, o.reason) for c, o in tried.items() if not o.ok}
                               ), tried
    reason = "; ".join(f"{c}: {o.status} ({o.reason.splitlines()[0] if o.reason else ''})"
                       for c, o in tried.items()) or "no clip"
    return IdentityFit(identity_id, "identity_failed", reason=f"no usable clip: {reason}",
                       seconds=time.perf_counter() - t0,
                       clip_failures={c: (o.status, o.stage, o.reason) for c, o in tried.items()}), tried


def process_clip(item: ClipItem, identity: IdentityFit, ctx: StageContext) -> ClipOutcome:
    """Decode, track, fit with the identity's β and Δg, render and encode one clip."""
    if identity.status != "ok":
        return identity_failure_outcome(item, identity)
    return run_clip(item, ctx, identity)


def run_clip(item: ClipItem, ctx: StageContext, identity: IdentityFit | None = None) -> ClipOutcome:
    """One clip through every stage; with ``identity`` its β and Δg are fixed, else fitted
    (the result then keeps the fit in ``out.fit`` for :func:`fit_identity`)."""
    out = ClipOutcome(item.clip_id, item.identity_id, item.split, item.path, status="ok",
                      started_at=time.time())
    try:
        t0 = time.perf_counter()
        frames, fps, out.notes = decode_clip(item, ctx.config)
        out.frames = len(frames)
        out.seconds["decode"] = time.perf_counter() - t0
        if identity is None:
            clip = _fit(frames, ctx)
        else:
            clip = _fit(frames, ctx, torch.as_tensor(identity.betas)[None],
                        torch.as_tensor(identity.static_offsets))
        out.seconds.update(clip.seconds)
        if clip.status != "ok":
            raise StageFailure(clip.status, "track", clip.reason)
        out.qc = clip.summary()
        bad = _bad_fraction(clip)
        if bad > ctx.config.max_bad_frames:
            raise StageFailure("fit_diverged", "fit", f"{bad:.0%} of frames did not fit "
                               f"(limit {ctx.config.max_bad_frames:.0%})")
        t0 = time.perf_counter()
        samples = clip_samples(item, clip, fps, out.notes, ctx)
        out.seconds["render"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        out.samples = [encode_sample(s, ctx.config.frame_codec, ctx.config.frame_crf, fps) for s in samples]
        out.seconds["encode"] = time.perf_counter() - t0
        out.fit = clip.fit if identity is None else None
    except StageFailure as exc:
        out.status, out.stage, out.reason = exc.status, exc.stage, exc.reason
    except Exception as exc:  # noqa: BLE001 - a crashing stage is a status row, not a dead job
        out.status, out.stage = "stage_error", "process"
        out.reason, out.error_type, out.transient = one_line(exc), type(exc).__name__, is_transient(exc)
        traceback.print_exc(limit=12, file=sys.stderr)      # the worker's log keeps the traceback
    if not out.ok:
        out.samples, out.fit = [], None
    out.finished_at = time.time()
    return out


def segments(num_frames: int, length: int) -> list[slice]:
    """Consecutive segments of ``length`` frames; the tail shorter than a segment is dropped
    (a clip shorter than one segment is one sample)."""
    if num_frames <= length:
        return [slice(0, num_frames)]
    return [slice(s, s + length) for s in range(0, num_frames - length + 1, length)]


def clip_samples(item: ClipItem, clip: ClipFit, fps: float, notes: list[str],
                 ctx: StageContext) -> list[ShardSample]:
    """Render the condition maps of a fitted clip and cut it into schema samples."""
    fit, head = clip.fit, ctx.head
    t = len(clip.track.crops)
    params = {k: v.numpy().astype(np.float32) for k, v in fit.params.to_dict().items()}
    static16 = fit.static_offsets.numpy().astype(np.float16)
    face_ids = head.face_vertex_ids.numpy().astype(np.int32)
    qc_frames = {k: _finite_list(v) for k, v in fit.qc.items()}
    qc_clip = _stable_summary(clip)
    meta_clip = {**ctx.provenance, "clip_id": item.clip_id, "identity_id": item.identity_id,
                 "split": item.split, "clip_frames": t, "fps": fps, "source": item.path,
                 "source_sha1": file_digest(item.path), "ingest_notes": notes,
                 "crop_size": int(clip.track.crops.shape[1])}
    samples = []
    for seg_index, seg in enumerate(segments(t, ctx.config.segment_frames)):
        with torch.no_grad():
            sub = fit.params.map(lambda x: x[seg] if x.shape[0] == t else x)
            verts = head(sub, fit.static_offsets, fit.dynamic_offsets[seg]).vertices.contiguous()
            maps = render_conditions(verts, head.faces, fit.camera.select(seg), head.face_mask)
        smplx = {k: v[seg] if v.shape[0] == t and k != "betas" else v for k, v in params.items()}
        smplx["betas"] = params["betas"].reshape(-1)
        smplx["camera_K"] = fit.camera.K[seg].numpy().astype(np.float32)
        smplx["camera_R"] = fit.camera.R.expand(t, 3, 3)[seg].numpy().astype(np.float32)
        smplx["camera_t"] = fit.camera.t.expand(t, 3)[seg].numpy().astype(np.float32)
        sil = maps.silhouette.numpy() > 0
        samples.append(ShardSample(
            key=sample_key(item.clip_id, seg_index),
            frames=np.ascontiguousarray(clip.track.crops[seg]),
            normals=maps.normal_rgb().numpy(),
            silhouette=sil, face_mask=(maps.face_mask.numpy() > 0) & sil,
            depth=(maps.depth.numpy() * sil).astype(np.float16) if ctx.config.render_depth else None,
            valid=np.ascontiguousarray(clip.track.valid[seg]),
            smplx=smplx,
            dynamic_offsets=fit.dynamic_offsets[seg].numpy().astype(np.float16),
            face_vertex_ids=face_ids, static_offsets=static16,
            qc={"status": fit.frame_status[seg],
                **{k: v[seg] for k, v in qc_frames.items()},
                "clip": qc_clip},
            meta={**meta_clip, "segment": seg_index, "frame_start": seg.start, "frame_stop": seg.stop,
                  "crop_boxes": np.round(clip.track.boxes[seg], 3).tolist()}))
    return samples


def _stable_summary(clip: ClipFit) -> dict:
    """The clip's QC summary without timings (samples must encode reproducibly)."""
    return {k: v for k, v in clip.summary().items() if k not in ("seconds", "fps")}


def _finite_list(values) -> list:
    arr = np.asarray(values, dtype=np.float64)
    return [None if not np.isfinite(v) else round(float(v), 5) for v in arr]


def provenance(model_sha1: str, licence: str) -> dict:
    """Versions and model identity stamped into every sample (no hostnames or times: samples
    must be reproducible byte for byte)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("expportrait", "torch", "numpy", "av", "mediapipe", "opencv-python-headless", "smplx"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {"head_model_sha1": model_sha1, "licence": licence, "versions": versions}
