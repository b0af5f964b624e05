"""`expportrait fit --video FILE | --image FILE --out DIR`: fit the personalized head."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="fit SMPL-X parameters, offsets and camera to a video or image")
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
    p.add_argument("--no-overlay", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def _head(model: Path | None):
    from expportrait.assets import synthetic_model_file
    from models.head.head_model import PersonalizedHead
    from models.head.smplx_file import HeadModelFileError, resolve_model_path
    try:
        path = resolve_model_path(model)
    except HeadModelFileError:
        if model is not None:
            raise
        path = synthetic_model_file(0)
    return PersonalizedHead.from_file(path), path


def run(args: argparse.Namespace) -> dict:
    import torch
    from preprocessing.clip_fit import fit_frames, overlay_frames
    from preprocessing.fitting import FitConfig, Fitter
    from preprocessing.ingest import open_video
    from preprocessing.tracking import FaceTracker
    from preprocessing.video import write_video

    args.out.mkdir(parents=True, exist_ok=True)
    source = args.video or args.image
    if args.video:
        reader = open_video(args.video, target_fps=args.fps, max_side=1280)
        if not reader.probe.ok:
            return _write_status(args.out, {"status": reader.status.value, "reason": reader.probe.reason,
                                            "source": str(source)})
        frames = []
        for i, _, f in reader:
            if args.max_frames and i >= args.max_frames:
                break
            frames.append(f)
        frames = np.stack(frames)
        fps = reader.plan.fps
    else:
        from PIL import Image
        try:
            frames = np.asarray(Image.open(args.image).convert("RGB"))[None]
        except Exception as exc:  # noqa: BLE001 - a bad image is a status, not a crash
            return _write_status(args.out, {"status": "not_an_image", "reason": str(exc),
                                            "source": str(source)})
        fps = None
    head, model_path = _head(args.model)
    fitter = Fitter(head, FitConfig(seed=args.seed))
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
        return _write_status(args.out, summary)
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


def _write_status(out: Path, summary: dict) -> dict:
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
