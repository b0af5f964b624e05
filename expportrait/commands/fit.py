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
    p.add_argument("--fps", type=float, default=None, help="resample to this frame rate")
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


def _head(model: Path | None, landmark_embedding: str = "auto"):
    from models.head.resolve import head_model_path
    from models.head.smplx_file import load_smplx_model
    from preprocessing.landmark_embedding import head_with_embedding, no_calibration_note
    path = head_model_path(model)
    head, embedding = head_with_embedding(load_smplx_model(path), landmark_embedding)
    if landmark_embedding == "auto" and embedding is None:     # as the preprocessing job says it
        print(no_calibration_note(path, "--landmark-embedding"), file=sys.stderr)
    return head, path, embedding


def run(args: argparse.Namespace) -> dict:
    import torch
    from preprocessing.clip_fit import fit_frames, overlay_frames
    from preprocessing.fitting import FitConfig, Fitter
    from preprocessing.ingest import open_video
    from preprocessing.tracking import FaceTracker
    from preprocessing.video import write_video

    source = args.video or args.image
    kind = "video" if args.video else "image"
    _check_readable(source, kind)                   # before anything is written
    args.out.mkdir(parents=True, exist_ok=True)
    if args.video:
        reader = open_video(args.video, target_fps=args.fps, max_side=1280)
        if not reader.probe.ok:
            _fail(args.out, reader.status.value, f"video {source}: {reader.probe.reason}", source)
        frames = []
        for i, _, f in reader:
            if args.max_frames and i >= args.max_frames:
                break
            frames.append(f)
        if not frames:
            _fail(args.out, "too_few_frames", f"video {source}: no frame could be decoded", source)
        frames = np.stack(frames)
        fps = reader.plan.fps
    else:
        from PIL import Image
        try:
            with Image.open(source) as img:
                frames = np.asarray(img.convert("RGB"))[None]
        except Exception as exc:  # noqa: BLE001 - any decoder failure means "not an image"
            _fail(args.out, "not_an_image", f"image {source}: cannot decode: {exc}", source)
        fps = None
    head, model_path, embedding = _head(args.model, args.landmark_embedding)
    # the embedding's points and its per-point weights, as the job's workers (StageContext)
    fitter = Fitter(head, FitConfig(seed=args.seed),
                    landmark_weights=embedding.weights() if embedding is not None else None)
    betas = static = None
    if args.identity_from:
        with np.load(args.identity_from) as prev:
            betas = torch.as_tensor(prev["betas"])
            static = torch.as_tensor(prev["static_offsets"].astype(np.float32))
    estimator = None
    if args.estimator:
        from preprocessing.estimators import load_estimator
        estimator = load_estimator(args.estimator, args.estimator_weights)
    clip = fit_frames(frames, head, FaceTracker(crop_size=args.crop_size), fov_deg=args.fov,
                      fitter=fitter, estimator=estimator, betas=betas, static_offsets=static)
    summary = {"source": str(source), "model": str(model_path), "identity": args.identity,
               **clip.summary()}
    if clip.fit is None:
        _write_status(args.out, summary)
        raise FitInputError(f"{kind} {source}: {clip.status}" + (f": {clip.reason}" if clip.reason else ""),
                            clip.status, source)
    fit = clip.fit
    p = fit.params
    np.savez(args.out / "fit.npz",
             **{k: v.numpy() for k, v in p.to_dict().items()},
             static_offsets=fit.static_offsets.numpy().astype(np.float16),
             dynamic_offsets=fit.dynamic_offsets.numpy().astype(np.float16),
             face_vertex_ids=head.face_vertex_ids.numpy(),
             camera_K=fit.camera.K.numpy(), camera_R=fit.camera.R.numpy(), camera_t=fit.camera.t.numpy(),
             crop_boxes=clip.track.boxes.astype(np.float32),
             landmarks_2d=clip.track.landmarks68.astype(np.float32),
             landmarks_found=clip.track.detected,
             **{f"qc_{k}": np.asarray(v) for k, v in fit.qc.items()})
    (args.out / "qc.json").write_text(json.dumps({
        "frame_status": fit.frame_status, "stage_seconds": fit.stage_seconds,
        **{k: (np.asarray(v).round(4) if np.asarray(v).dtype.kind == "f" else np.asarray(v)).tolist()
           for k, v in fit.qc.items()}}))
    if not args.no_overlay:
        ov = overlay_frames(clip, head)
        if len(ov) > 1:
            summary["overlay"] = str(write_video(args.out / "overlay.mp4", ov, fps or 25.0))
        else:
            from PIL import Image
            Image.fromarray(ov[0]).save(args.out / "overlay.png")
            summary["overlay"] = str(args.out / "overlay.png")
    head.to_trimesh(head.neutral(p.betas, fit.static_offsets)[0]).export(args.out / "neutral.ply")
    summary["outputs"] = str(args.out)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


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
