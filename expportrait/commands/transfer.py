"""`expportrait transfer` and `expportrait edit`: drive a personalized head from a fitted clip.

    expportrait transfer --driver CLIP --target FIT --model EXPORT_DIR --out DIR
        [--mode both|expression|pose] [--mouth S --eyes S --brows S --jaw S]
        [--mesh npz|ply|none] [--size 256]
    expportrait edit --clip CLIP --model EXPORT_DIR --out DIR --mouth 1.5 --brows 0.5 ...

A fitted clip is ``fit.npz`` from ``expportrait fit`` (or its folder), or a synthetic corpus
clip ``clips/<id>.npz`` (β and Δg read from ``identities/<id>.npz`` beside it). The target's
reference is its frame ``--target-frame`` (a portrait fit has one frame).

- expression: the driver's (ψ, jaw), edited per region (mouth, eyes, brows) and jaw scale,
  gives the target's Δf through the exported transfer module (``--model``; without one Δf is
  zero). ``--mode pose`` keeps the target's reference expression.
- pose: the driver's head/neck motion relative to its first frame, applied to the target's
  reference pose, seen in the target's camera (models/transfer/retarget.py for the
  convention). ``--mode expression`` keeps the target's reference pose and camera.
Writes ``normals.mp4`` (the target's rendered normal maps), ``meshes.npz`` (posed vertices
(T, N, 3) float32 in world space, faces, per-frame params, Δf) or one PLY per frame, and
``summary.json``; `edit` is `transfer` of a clip onto itself with edits.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PER_FRAME = ("expression", "jaw_pose", "global_orient", "neck_pose", "head_pose", "leye_pose",
             "reye_pose", "transl")


@dataclass
class FittedClip:
    """SMPL-X parameters per frame, β, Δg and cameras of one subject's clip."""

    arrays: dict[str, np.ndarray]       # PER_FRAME (T, ...) + camera_K/R/t (T, ...)
    betas: np.ndarray                   # (300,)
    static_offsets: np.ndarray          # (N_s, 3)
    image_size: int
    source: str

    @property
    def num_frames(self) -> int:
        return int(self.arrays["expression"].shape[0])

    def frame(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[i] for k, v in self.arrays.items()}


def load_fitted(path: str | Path) -> FittedClip:
    """A ``fit.npz`` (or its folder) or a synthetic corpus clip ``.npz``."""
    path = Path(path)
    if path.is_dir():
        path = path / "fit.npz"
    if not path.is_file():
        raise FileNotFoundError(f"no fitted clip at {path} (a fit.npz or a corpus clips/<id>.npz)")
    with np.load(path, allow_pickle=False) as z:
        a = {k: z[k] for k in z.files}
    t = a["expression"].shape[0]
    arrays = {k: np.asarray(a[k], np.float32).reshape(t, 3) if k != "expression" else np.asarray(a[k], np.float32)
              for k in PER_FRAME if k in a}
    for k in PER_FRAME:
        arrays.setdefault(k, np.zeros((t, 3), np.float32))
    for k, shape in (("camera_K", (3, 3)), ("camera_R", (3, 3)), ("camera_t", (3,))):
        v = np.asarray(a[k], np.float32)
        arrays[k] = np.broadcast_to(v.reshape(-1, *shape), (t, *shape)).copy()
    if "betas" in a:                                       # expportrait fit
        betas, static = a["betas"].reshape(-1), a["static_offsets"]
    else:                                                  # synthetic corpus clip
        ident = path.parent.parent / "identities" / f"{path.stem.split('_')[0]}.npz"
        if not ident.is_file():
            raise FileNotFoundError(f"{path} has no β: expected its identity file {ident}")
        with np.load(ident, allow_pickle=False) as z:
            betas, static = z["betas"], z["static_offsets"]
    size = int(a["image_size"][0]) if "image_size" in a else int(round(2 * arrays["camera_K"][0, 0, 2] + 1))
    return FittedClip(arrays, np.asarray(betas, np.float32), np.asarray(static, np.float32), size, str(path))


def transfer(driver: FittedClip, target: FittedClip, head, model=None, mode: str = "both", edit=None,
             target_frame: int = 0, camera_motion: bool = True) -> dict:
    """The target's per-frame head: HeadParams, Δg, Δf (T, N_face, 3) and cameras."""
    import torch

    from models.render.camera import Camera
    from models.transfer.edit import ExpressionEditor
    from models.transfer.inputs import head_params, neutral_inputs
    from models.transfer.retarget import EYE_JOINTS, POSE_JOINTS, retarget_camera, retarget_pose

    if mode not in ("both", "expression", "pose"):
        raise ValueError(f"mode {mode!r}: use both, expression or pose")
    t = driver.num_frames
    ref = target.frame(target_frame)
    tt = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.float32)
    rep = lambda x: np.broadcast_to(x, (t, *np.shape(x))).copy()
    arrays = {}
    if mode in ("both", "expression"):
        expr, jaw = tt(driver.arrays["expression"]), tt(driver.arrays["jaw_pose"])
        if edit is not None and not edit.is_identity:
            expr, jaw = ExpressionEditor(head).apply(expr, jaw, edit)
    else:
        expr, jaw = tt(rep(ref["expression"])), tt(rep(ref["jaw_pose"]))
    arrays["expression"], arrays["jaw_pose"] = expr.numpy(), jaw.numpy()
    if mode in ("both", "pose"):
        pose = retarget_pose({k: tt(driver.arrays[k]) for k in POSE_JOINTS + EYE_JOINTS + ("transl",)},
                             {k: tt(ref[k]) for k in POSE_JOINTS + EYE_JOINTS + ("transl",)})
        arrays.update({k: v.numpy() for k, v in pose.items()})
        R, tr = retarget_camera(tt(driver.arrays["camera_R"]), tt(driver.arrays["camera_t"]),
                                tt(ref["camera_R"]), tt(ref["camera_t"]), camera_motion=camera_motion)
    else:
        arrays.update({k: rep(ref[k]) for k in POSE_JOINTS + EYE_JOINTS + ("transl",)})
        R, tr = tt(rep(ref["camera_R"])), tt(rep(ref["camera_t"]))
    params = head_params({**arrays, "betas": target.betas})
    static = tt(target.static_offsets)
    if model is not None:
        with torch.no_grad():
            neutral, static_face = neutral_inputs(head, params.betas, static[None])
            dynamic = model(expr[None], jaw[None], neutral, static_face)[0].float()
    else:
        dynamic = torch.zeros(t, head.num_face_vertices, 3)
    camera = Camera.from_matrices(tt(rep(ref["camera_K"])), R, tr, (target.image_size,) * 2)
    return {"params": params, "static_offsets": static, "dynamic_offsets": dynamic, "camera": camera}


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
    from models.transfer.inputs import scaled_camera
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
        cam = res["camera"]
        cam = scaled_camera(cam.K, cam.R, cam.t, args.size)
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
