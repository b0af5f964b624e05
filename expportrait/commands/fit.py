"""`expportrait fit --video FILE | --image FILE --out DIR`: fit the personalized head.

Exit codes (through :func:`expportrait.cli.main`): 0 when a fit was written (frames whose fit
diverged are flagged in ``qc.json``, not fatal); 2 for an input that cannot be fitted, with a
one-line JSON error ``{"error": "FitInputError", "message": ..., "status": ..., "source": ...}``.
``status`` says why: ``file_not_found``, ``not_a_file``, ``unreadable`` (checked before
anything is written), the ingest statuses (``not_a_video``, ``corrupt_container``,
``no_video_stream``, ``zero_duration``, ``too_few_frames``), ``not_an_image``, or a tracking
status (``no_face``, ``multi_face``, ``face_too_small``); for the latter two groups
``DIR/summary.json`` records the same status.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="fit SMPL-X parameters, offsets and camera to a video or image",
                       epilog="exit codes: 0 fit written; 2 an input that cannot be fitted (missing, "
                              "unreadable, undecodable, no usable face) or a bad model file, with a "
                              "one-line JSON error {error, message} (plus status and source for an input)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--video", type=Path)
    src.add_argument("--image", type=Path, help="a single portrait (the source at inference)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--identity", default=None, help="identity id recorded with the fit")
    p.add_argument("--identity-from", type=Path, default=None,
                   help="fit.npz of another clip of this identity: reuse its β and Δg")
    p.add_argument("--model", type=Path, default=None,
                   help="SMPL-X-format .npz (default: head.model_path / $EXPPORTRAIT_SMPLX_PATH, "
                        "else the synthetic model)")
    p.add_argument("--fps", type=float, default=25.0,
                   help="decode at this frame rate, as the preprocessing job's stages.fps (0: the source's)")
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--crop-size", type=int, default=256)
    p.add_argument("--fov", type=float, default=20.0, help="assumed vertical FOV of the source")
    p.add_argument("--estimator", default=None,
                   help="dense depth/normal estimator 'package.module:factory' (none shipped)")
    p.add_argument("--estimator-weights", type=Path, default=None, help="its local weights file")
    p.add_argument("--landmark-embedding", default="auto",
                   help="where the tracker's 68 points lie on the model: auto (the calibrated file for this "
                        "model, if shipped), none (the model's iBUG-68) or a file (preprocessing.landmark_calibration)")
    p.add_argument("--no-overlay", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def _model_path(model: Path | None) -> Path:
    """``--model``, else ``$EXPPORTRAIT_SMPLX_PATH``, else the synthetic model."""
    from models.head.resolve import head_model_path
    return head_model_path(model)


def stage_config(args: argparse.Namespace):
    """The preprocessing job's stage config with this command's options (one clip of any length;
    the job's defaults otherwise: frame rate, size cap, fitter)."""
    from preprocessing.clip_records import StageConfig
    return StageConfig(fps=args.fps or None, min_frames=1, max_frames=args.max_frames,
                       crop_size=args.crop_size, fov_deg=args.fov, landmark_embedding=args.landmark_embedding,
                       fit={"seed": args.seed}, estimator=args.estimator,
                       estimator_weights=str(args.estimator_weights) if args.estimator_weights else None)


def run(args: argparse.Namespace) -> dict:
    """Decode, track, crop and fit with the preprocessing job's stages; write the fit and its QC."""
    from preprocessing.clip_records import ClipItem, IdentityFit
    from preprocessing.clip_stages import StageContext, StageFailure, decode_clip, decode_image, fit_clip
    from preprocessing.landmark_embedding import no_calibration_note

    source = args.video or args.image
    kind = "video" if args.video else "image"
    _check_readable(source, kind)                   # before anything is written
    args.out.mkdir(parents=True, exist_ok=True)
    config = stage_config(args)
    model_path = _model_path(args.model)
    try:
        frames, fps = (decode_clip(ClipItem(source.stem, str(source), args.identity or "subject"), config)[:2]
                       if args.video else (decode_image(source), None))
    except StageFailure as exc:
        _fail(args.out, exc.status, f"{kind} {source}: {exc.reason}", source)
    ctx = StageContext(model_path, config)
    if args.landmark_embedding == "auto" and ctx.landmark_embedding is None:     # as the job says it
        print(no_calibration_note(model_path, "--landmark-embedding"), file=sys.stderr)
    identity = None
    if args.identity_from:
        with np.load(args.identity_from) as prev:
            identity = IdentityFit(args.identity or "subject", "ok", betas=prev["betas"].reshape(-1),
                                   static_offsets=prev["static_offsets"].astype(np.float32))
    try:
        clip = fit_clip(frames, ctx, identity, check_bad_frames=False)   # diverged frames: flagged in qc.json
    except StageFailure as exc:
        clip = exc.clip
    summary = {"source": str(source), "model": str(model_path), "identity": args.identity, **clip.summary()}
    if clip.fit is None:
        _write_status(args.out, summary)
        raise FitInputError(f"{kind} {source}: {clip.status}" + (f": {clip.reason}" if clip.reason else ""),
                            clip.status, source)
    _write_fit(args.out, clip, ctx.head)
    if not args.no_overlay:
        summary["overlay"] = _write_overlay(args.out, clip, ctx.head, fps)
    ctx.head.to_trimesh(ctx.head.neutral(clip.fit.params.betas, clip.fit.static_offsets)[0]).export(
        args.out / "neutral.ply")
    summary["outputs"] = str(args.out)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _write_fit(out: Path, clip, head) -> None:
    """``fit.npz`` (parameters, offsets, cameras, crop boxes, landmarks, QC) and ``qc.json``."""
    fit = clip.fit
    np.savez(out / "fit.npz",
             **{k: v.numpy() for k, v in fit.params.to_dict().items()},
             static_offsets=fit.static_offsets.numpy().astype(np.float16),
             dynamic_offsets=fit.dynamic_offsets.numpy().astype(np.float16),
             face_vertex_ids=head.face_vertex_ids.numpy(),
             camera_K=fit.camera.K.numpy(), camera_R=fit.camera.R.numpy(), camera_t=fit.camera.t.numpy(),
             crop_boxes=clip.track.boxes.astype(np.float32),
             landmarks_2d=clip.track.landmarks68.astype(np.float32),
             landmarks_found=clip.track.detected,
             **{f"qc_{k}": np.asarray(v) for k, v in fit.qc.items()})
    (out / "qc.json").write_text(json.dumps({
        "frame_status": fit.frame_status, "stage_seconds": fit.stage_seconds,
        **{k: (np.asarray(v).round(4) if np.asarray(v).dtype.kind == "f" else np.asarray(v)).tolist()
           for k, v in fit.qc.items()}}))


def _write_overlay(out: Path, clip, head, fps: float | None) -> str:
    """``overlay.mp4`` (a video) or ``overlay.png`` (an image): crops, fit blended, normal map."""
    from PIL import Image
    from preprocessing.clip_fit import overlay_frames
    from preprocessing.video import write_video
    ov = overlay_frames(clip, head)
    if len(ov) > 1:
        return str(write_video(out / "overlay.mp4", ov, fps or 25.0))
    Image.fromarray(ov[0]).save(out / "overlay.png")
    return str(out / "overlay.png")


class FitInputError(ValueError):
    """An input that cannot be fitted; ``details`` goes into the CLI's JSON error line."""

    def __init__(self, message: str, status: str, source: Path | str) -> None:
        super().__init__(message)
        self.status = status
        self.details = {"status": status, "source": str(source)}


def _check_readable(path: Path, kind: str) -> None:
    if not path.exists():
        raise FitInputError(f"{kind} not found: {path}", "file_not_found", path)
    if not path.is_file():
        raise FitInputError(f"{kind} is not a file: {path}", "not_a_file", path)
    if not os.access(path, os.R_OK):
        raise FitInputError(f"{kind} is not readable (permission denied): {path}", "unreadable", path)


def _fail(out: Path, status: str, message: str, source: Path):
    """Record the status in ``out/summary.json`` and raise it as a bad input (exit 2)."""
    _write_status(out, {"status": status, "reason": message, "source": str(source)})
    raise FitInputError(message, status, source)


def _write_status(out: Path, summary: dict) -> dict:
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
