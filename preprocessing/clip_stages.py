"""The per-clip stages of the preprocessing job, as plain functions (no Ray, no shard I/O).

``decode -> track + landmarks -> fit -> render conditions -> segment into schema samples``;
:func:`fit_identity` gives the β and Δg that all clips of one identity share. The Ray driver
(``pipelines/preprocess``), the benchmark's bare loop, ``expportrait fit`` and inference
(``expportrait.reenactment``: :func:`decode_clip`, :func:`fit_clip` with a :class:`StageContext`
rebuilt from the job's :func:`stage_spec`) call exactly these functions: they are the only
implementation of the subject path.

A clip never raises out of :func:`process_clip`: failures come back as a :class:`ClipOutcome`
with a status, the stage that failed and a reason.
"""
from __future__ import annotations

import dataclasses
import sys
import time
import traceback
from contextlib import contextmanager
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


#: the format of :func:`stage_spec` (the preprocessing spec a model package carries)
STAGE_SPEC_FORMAT = "expportrait-stage-spec/1"


def resolved_fit_config(config: StageConfig) -> FitConfig:
    """The fitter's settings of a stage config: its overrides over FitConfig's defaults, the
    stage's field of view."""
    return FitConfig(**{**config.fit, "fov_deg": config.fov_deg})


class StageContext:
    """What one worker process loads once: the head model (with the landmark embedding), tracker,
    fitter, estimator. ``embedding``: a :class:`LandmarkEmbedding` (or None: the model's own
    landmarks) given instead of resolving ``config.landmark_embedding``; ``fit_config``: the
    fitter's settings given whole (a packed spec's) instead of :func:`resolved_fit_config`;
    ``fit_threads``: torch threads while fitting (None: the process's), as the job's workers fit:
    the fitter's float reductions depend on the thread count (1.7e-4 in the parameters between 1
    and 2 threads, benchmarks/parity.py)."""

    def __init__(self, model_path: str | Path, config: StageConfig, subdivision: int = 1,
                 model_sha1: str | None = None, fit_config: FitConfig | None = None,
                 embedding: object = "resolve", fit_threads: int | None = None) -> None:
        from models.head.head_model import PersonalizedHead
        from models.head.smplx_file import load_smplx_model
        from .estimators import load_estimator
        from .landmark_embedding import resolve_embedding

        self.config = config
        self.subdivision = subdivision
        self.fit_threads = fit_threads
        self.model_path = str(model_path)
        self.model_sha1 = model_sha1 or file_digest(model_path)   # the job passes the one it hashed
        model = load_smplx_model(model_path)
        if isinstance(embedding, str):
            embedding = resolve_embedding(config.landmark_embedding, model)
        self.landmark_embedding = embedding
        self.head = PersonalizedHead(model, subdivision_levels=subdivision,
                                     landmark_embedding=embedding.as_head_argument() if embedding else None)
        self.tracker = FaceTracker(crop_size=config.crop_size)
        self.fit_config = fit_config or resolved_fit_config(config)
        self.fitter = Fitter(self.head, self.fit_config,
                             landmark_weights=embedding.weights() if embedding is not None else None,
                             dense_landmarks=embedding.dense_points() if embedding is not None else None)
        self.estimator = (load_estimator(config.estimator, config.estimator_weights)
                          if config.estimator else None)
        self.provenance = provenance(self.model_sha1, config.licence)

    @classmethod
    def from_spec(cls, spec: dict, model_path: str | Path, subdivision: int | None = None) -> "StageContext":
        """The context a :func:`stage_spec` describes, for the head model at ``model_path``
        (``subdivision``, when given, must be the spec's). ValueError naming what does not fit."""
        config, fit_config, embedding = read_stage_spec(spec)
        if subdivision is not None and subdivision != spec["subdivision"]:
            raise ValueError(f"stage spec: the data was made with subdivision {spec['subdivision']}, "
                             f"the head model is used with {subdivision}")
        if embedding is not None:
            from models.head.smplx_file import load_smplx_model
            from .landmark_embedding import model_key
            key = model_key(load_smplx_model(model_path))
            if embedding.model_key != key:
                raise ValueError(f"stage spec: its landmark embedding was made for model {embedding.model_key}, "
                                 f"not {model_path} ({key})")
        return cls(model_path, config, spec["subdivision"], fit_config=fit_config, embedding=embedding,
                   fit_threads=spec.get("fit_threads"))


def stage_spec(config: StageConfig, model_path: str | Path, subdivision: int = 1,
               fit_threads: int | None = None) -> dict:
    """Everything the stages do to a clip, resolved (JSON): the stage config with its defaults,
    the fitter's whole settings, the subdivision, the landmark embedding (its file, digest,
    per-point weights and the embedding itself) and the workers' torch threads (``fit_threads``).
    The job writes it into its ``summary.json``, the package carries it, inference rebuilds its
    :class:`StageContext` from it."""
    from models.head.smplx_file import load_smplx_model
    from .landmark_embedding import resolve_embedding

    model = load_smplx_model(model_path)
    emb = resolve_embedding(config.landmark_embedding, model)
    embedding = None
    if emb is not None:
        file = Path(emb.file_name if config.landmark_embedding == "auto" else config.landmark_embedding)
        embedding = {"setting": config.landmark_embedding, "file": file.name, "digest": emb.digest(),
                     "weights": emb.weights().round(6).tolist(), "model_key": emb.model_key,
                     "convention": emb.convention, "frames": int(emb.frames),
                     "faces": emb.faces.astype(int).tolist(), "bary": emb.bary.astype(float).tolist(),
                     "residual_pct": emb.residual_pct.astype(float).tolist(),
                     "model_residual_pct": [None if np.isnan(v) else float(v) for v in emb.model_residual_pct]}
    return {"format": STAGE_SPEC_FORMAT, "stages": config.model_dump(mode="json"),
            "fit": dataclasses.asdict(resolved_fit_config(config)), "subdivision": subdivision,
            "head_model_sha1": file_digest(model_path), "fit_threads": fit_threads, "landmark_embedding": embedding}


def read_stage_spec(spec: dict) -> tuple[StageConfig, FitConfig, object]:
    """(StageConfig, FitConfig, LandmarkEmbedding or None) of a :func:`stage_spec`; ValueError
    for another format or an embedding whose digest does not match its arrays."""
    from .landmark_embedding import LandmarkEmbedding

    if not isinstance(spec, dict) or spec.get("format") != STAGE_SPEC_FORMAT:
        found = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise ValueError(f"stage spec format {found!r}: expected {STAGE_SPEC_FORMAT!r}")
    config = StageConfig.model_validate(spec["stages"])
    fit_config = FitConfig(**spec["fit"])
    e = spec.get("landmark_embedding")
    if e is None:
        return config, fit_config, None
    emb = LandmarkEmbedding(faces=np.asarray(e["faces"], np.int64), bary=np.asarray(e["bary"], np.float32),
                            model_key=e["model_key"], residual_pct=np.asarray(e["residual_pct"], np.float32),
                            model_residual_pct=np.asarray(e["model_residual_pct"], np.float32),
                            frames=int(e["frames"]), convention=e["convention"])
    if emb.digest() != e["digest"]:
        raise ValueError(f"stage spec: landmark embedding {e['file']}: digest {emb.digest()} of its arrays, "
                         f"recorded {e['digest']}")
    return config, fit_config, emb


class StageFailure(Exception):
    """A clip the stages cannot use; ``clip``: the fit so far (its timings, and its QC when the
    fit diverged)."""

    def __init__(self, status: str, stage: str, reason: str, clip: ClipFit | None = None) -> None:
        super().__init__(f"{stage}: {status}: {reason}")
        self.status, self.stage, self.reason, self.clip = status, stage, reason, clip


#: what :func:`decode_image` reads (a portrait source at inference, ``expportrait fit --image``)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def decode_image(path: str | Path) -> np.ndarray:
    """One RGB frame (1, H, W, 3) of an image file; StageFailure ``not_an_image`` if undecodable."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))[None]
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "not an image"
        raise StageFailure("not_an_image", "decode", f"cannot decode: {exc}") from None


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


@contextmanager
def torch_threads(n: int | None):
    """torch's intra-op threads set to ``n`` inside (None: unchanged), restored after."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _bad_fraction(clip: ClipFit) -> float:
    statuses = clip.fit.frame_status
    return 1.0 - statuses.count("ok") / max(1, len(statuses))


def fit_clip(frames: np.ndarray, ctx: StageContext, identity: IdentityFit | None = None,
             check_bad_frames: bool = True) -> ClipFit:
    """Track, crop and fit decoded frames (the identity's β and Δg fixed when given, else
    fitted); :class:`StageFailure` when no usable face is tracked or (``check_bad_frames``) more
    than ``max_bad_frames`` of the frames did not fit."""
    betas = static = None
    if identity is not None:
        betas, static = torch.as_tensor(identity.betas)[None], torch.as_tensor(identity.static_offsets)
    with torch_threads(ctx.fit_threads):
        clip = fit_frames(frames, ctx.head, ctx.tracker, fov_deg=ctx.config.fov_deg, fitter=ctx.fitter,
                          estimator=ctx.estimator, betas=betas, static_offsets=static)
    if clip.status != "ok":
        raise StageFailure(clip.status, "track", clip.reason, clip)
    bad = _bad_fraction(clip)
    if check_bad_frames and bad > ctx.config.max_bad_frames:
        raise StageFailure("fit_diverged", "fit", f"{bad:.0%} of frames did not fit "
                           f"(limit {ctx.config.max_bad_frames:.0%})", clip)
    return clip


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
        clip = fit_clip(frames, ctx, identity)
        out.seconds.update(clip.seconds)
        out.qc = clip.summary()
        t0 = time.perf_counter()
        samples = clip_samples(item, clip, fps, out.notes, ctx)
        out.seconds["render"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        out.samples = [encode_sample(s, ctx.config.frame_codec, ctx.config.frame_crf, fps) for s in samples]
        out.seconds["encode"] = time.perf_counter() - t0
        out.fit = clip.fit if identity is None else None
    except StageFailure as exc:
        out.status, out.stage, out.reason = exc.status, exc.stage, exc.reason
        if exc.clip is not None:
            out.seconds.update(exc.clip.seconds)
            out.qc = exc.clip.summary() if exc.clip.fit is not None else out.qc
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
