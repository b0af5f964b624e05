"""`expportrait transfer` and `expportrait edit`: drive a personalized head from a fitted clip.

    expportrait transfer --driver CLIP --target FIT --model EXPORT_DIR --out DIR
        [--mode both|expression|pose] [--mouth S --eyes S --brows S --jaw S]
        [--mesh npz|ply|none] [--size 256]
    expportrait edit --clip CLIP --model EXPORT_DIR --out DIR --mouth 1.5 --brows 0.5 ...

A fitted clip is ``fit.npz`` from ``expportrait fit`` (or its folder), or a synthetic corpus
clip ``clips/<id>.npz`` (β and Δg read from ``identities/<id>.npz`` beside it). The target's
reference is its frame ``--target-frame`` (a portrait fit has one frame).

What is transferred (expression through the transfer module, pose retargeted) is
:func:`preprocessing.fitted_clip.transfer`; this module parses the arguments and writes the files.
Writes ``normals.mp4`` (the target's rendered normal maps), ``meshes.npz`` (posed vertices
(T, N, 3) float32 in world space, faces, per-frame params, Δf) or one PLY per frame, and
``summary.json``; `edit` is `transfer` of a clip onto itself with edits.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from preprocessing.fitted_clip import FittedClip, load_fitted, transfer


def add_parser(sub: argparse._SubParsersAction) -> None:
    from preprocessing.errors import nonnegative_int
    p = sub.add_parser("transfer", help="drive a target's personalized head from a driver's fitted clip")
    p.add_argument("--driver", required=True, type=Path, help="fit.npz (or folder) or corpus clips/<id>.npz")
    p.add_argument("--target", required=True, type=Path, help="fit.npz (portrait or clip) or corpus clip")
    p.add_argument("--target-frame", type=nonnegative_int, default=0, help="the target's reference frame")
    p.add_argument("--mode", choices=("both", "expression", "pose"), default="both")
    _common(p)
    p.set_defaults(func=run_transfer)
    e = sub.add_parser("edit", help="edit a fitted clip: per-region expression intensity, jaw scale")
    e.add_argument("--clip", required=True, type=Path, help="fit.npz (or folder) or corpus clips/<id>.npz")
    _common(e)
    e.set_defaults(func=run_edit)


def _common(p: argparse.ArgumentParser) -> None:
    from preprocessing.errors import (
        finite_float,
        nonnegative_int,
        positive_float,
        positive_int,
    )
    p.add_argument("--model", type=Path, default=None,
                   help="exported transfer module (save_pretrained folder); none: Δf = 0")
    p.add_argument("--out", required=True, type=Path)
    for region in ("mouth", "eyes", "brows", "jaw"):
        p.add_argument(f"--{region}", type=finite_float, default=1.0, help=f"{region} intensity (1 = as driven)")
    p.add_argument("--mesh", choices=("npz", "ply", "none"), default="npz")
    p.add_argument("--size", type=positive_int, default=256, help="rendered normal video size (pixels)")
    p.add_argument("--fps", type=positive_float, default=25.0)
    p.add_argument("--head-model", type=Path, default=None, help="SMPL-X-format .npz (default: synthetic)")
    p.add_argument("--subdivision", type=nonnegative_int, default=1)
    p.add_argument("--static-camera", action="store_true", help="ignore the driver's camera motion")


def run_transfer(args: argparse.Namespace) -> dict:
    return _run(load_fitted(args.driver), load_fitted(args.target), args, args.mode, args.target_frame)


def run_edit(args: argparse.Namespace) -> dict:
    clip = load_fitted(args.clip)
    return _run(clip, clip, args, "both", 0)


def _run(driver: FittedClip, target: FittedClip, args: argparse.Namespace, mode: str, target_frame: int) -> dict:
    import torch

    from models.head.resolve import head_model_path
    from models.head.head_model import PersonalizedHead
    from models.transfer.edit import EditSpec
    from models.render.conditions import render_conditions
    from preprocessing.video import write_video

    head = PersonalizedHead.from_file(head_model_path(args.head_model), subdivision_levels=args.subdivision)
    if target.static_offsets.shape[0] != head.num_vertices:
        raise ValueError(f"the target's Δg has {target.static_offsets.shape[0]} vertices, the head model "
                         f"{head.num_vertices}: use the head model (--head-model, --subdivision) it was fitted with")
    model = None
    if args.model is not None:
        from models.transfer import ExpressionTransfer
        model = ExpressionTransfer.from_pretrained(args.model).eval()
        if model.num_face_vertices != head.num_face_vertices:
            raise ValueError(f"the model was trained for {model.num_face_vertices} face vertices, the head "
                             f"model has {head.num_face_vertices}")
    edit = EditSpec(mouth=args.mouth, eyes=args.eyes, brows=args.brows, jaw=args.jaw)
    res = transfer(driver, target, head, model, mode, edit, target_frame, camera_motion=not args.static_camera)
    args.out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        verts = head(res["params"], res["static_offsets"], res["dynamic_offsets"]).vertices.contiguous()
        cam = res["camera"].resized(args.size)
        normals = render_conditions(verts, head.faces, cam, head.face_mask).normal_rgb().numpy()
    video = write_video(args.out / "normals.mp4", normals, args.fps)
    mesh_out = None
    if args.mesh == "npz":
        mesh_out = args.out / "meshes.npz"
        np.savez_compressed(mesh_out, vertices=verts.numpy().astype(np.float32), faces=head.faces.numpy(),
                            dynamic_offsets=res["dynamic_offsets"].numpy().astype(np.float32),
                            face_vertex_ids=head.face_vertex_ids.numpy(),
                            **{k: v.numpy() for k, v in res["params"].to_dict().items()})
    elif args.mesh == "ply":
        mesh_out = args.out / "meshes"
        mesh_out.mkdir(exist_ok=True)
        for i in range(verts.shape[0]):
            head.to_trimesh(verts[i]).export(mesh_out / f"frame_{i:05d}.ply")
    summary = {"driver": driver.source, "target": target.source, "mode": mode, "frames": int(verts.shape[0]),
               "model": str(args.model) if args.model else None, "edit": vars(edit),
               "normals_video": str(video), "meshes": str(mesh_out) if mesh_out else None,
               "max_dynamic_offset_mm": round(float(res["dynamic_offsets"].norm(dim=-1).max()) * 1000, 3)}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
