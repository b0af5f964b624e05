"""`expportrait head ...`: write the synthetic model; render a sweep of the head."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from preprocessing.errors import nonnegative_int, positive_float, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    head = sub.add_parser("head", help="the head representation").add_subparsers(dest="head_cmd", required=True)
    p = head.add_parser("synth-model", help="write the synthetic SMPL-X-format model (.npz)")
    p.add_argument("--out", required=True, type=Path, help="output .npz path")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=synth_model)

    p = head.add_parser("render", help="render a sweep (jaw, expression, pose, offsets) to mp4 + maps")
    p.add_argument("--model", type=Path, default=None,
                   help="SMPL-X-format .npz (default: head.model_path / $EXPPORTRAIT_SMPLX_PATH)")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--size", type=positive_int, default=256, help="image side in pixels")
    p.add_argument("--frames-per-segment", type=positive_int, default=16)
    p.add_argument("--fps", type=positive_float, default=24.0)
    p.add_argument("--subdivision", type=nonnegative_int, default=1, help="upsampling levels (4x faces each)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "pytorch3d"])
    p.add_argument("--seed", type=int, default=0, help="seed of the demo offset fields")
    p.set_defaults(func=render)


def synth_model(args: argparse.Namespace) -> dict:
    from models.head.smplx_file import save_smplx_model
    from models.head.synthetic import build_synthetic_model
    path = save_smplx_model(build_synthetic_model(args.seed), args.out)
    return {"model": str(path), "seed": args.seed}


SWEEP = ("jaw_open", "smile", "brow_raise", "blink", "pucker", "head_yaw", "neck_pitch",
         "shape", "static_offsets", "dynamic_offsets")


def build_sweep(head, frames_per_segment: int, seed: int):
    """Parameters and offsets of the demo sweep: each segment ramps one thing 0 -> peak -> 0."""
    from models.head.head_model import HeadParams
    from models.head.offsets import smooth_random_field

    f = frames_per_segment
    t_total = f * len(SWEEP)
    params = HeadParams.zeros(t_total)
    params.betas = torch.zeros(t_total, params.betas.shape[1])
    gen = torch.Generator().manual_seed(seed)
    rest = head.neutral(torch.zeros(1, params.betas.shape[1]))[0]
    static = smooth_random_field(rest, gen, amplitude=0.006, num_blobs=8, sigma=(0.02, 0.05))
    dynamic = smooth_random_field(rest[head.face_vertex_ids], gen, amplitude=0.003,
                                  num_blobs=6, sigma=(0.006, 0.015))
    identity = torch.randn(params.betas.shape[1], generator=gen) * 1.5
    static_w, dynamic_w = torch.zeros(t_total), torch.zeros(t_total)
    ramp = torch.sin(torch.linspace(0, math.pi, f))
    for seg, name in enumerate(SWEEP):
        sl = slice(seg * f, (seg + 1) * f)
        if name == "jaw_open":
            params.jaw_pose[sl, 0] = 0.35 * ramp
        elif name in ("smile", "brow_raise", "blink", "pucker"):
            k, peak = {"smile": (1, 2.0), "brow_raise": (2, 2.0), "blink": (3, 1.6),
                       "pucker": (6, 2.0)}[name]
            params.expression[sl, k] = peak * ramp
        elif name == "head_yaw":
            params.global_orient[sl, 1] = 0.6 * torch.sin(torch.linspace(0, 2 * math.pi, f))
        elif name == "neck_pitch":
            params.neck_pose[sl, 0] = 0.3 * ramp
        elif name == "shape":
            params.betas[sl] = identity * ramp[:, None]
        elif name == "static_offsets":
            static_w[sl] = ramp
        else:
            dynamic_w[sl] = ramp
    return params, static[None] * static_w[:, None, None], dynamic[None] * dynamic_w[:, None, None]


def render(args: argparse.Namespace) -> dict:
    from models.head.head_model import PersonalizedHead
    from models.head.resolve import head_model_path
    from models.render.camera import portrait_camera
    from models.render.conditions import render_conditions
    from preprocessing.video import write_video
    from PIL import Image
    from tqdm import tqdm

    head = PersonalizedHead.from_file(head_model_path(args.model),
                                      subdivision_levels=args.subdivision)
    params, static, dynamic = build_sweep(head, args.frames_per_segment, args.seed)
    t_total, f = params.num_frames, args.frames_per_segment
    camera = portrait_camera((args.size, args.size))
    args.out.mkdir(parents=True, exist_ok=True)
    panels, key_frames = [], {}
    chunk = 16
    with torch.no_grad():
        for start in tqdm(range(0, t_total, chunk), desc="render", unit="chunk"):
            sl = slice(start, min(start + chunk, t_total))
            out = head(params.map(lambda x: x[sl]), static_offsets=static[sl],
                       dynamic_offsets=dynamic[sl])
            maps = render_conditions(out.vertices, head.faces, camera, head.face_mask,
                                     backend=args.backend)
            normal, depth = maps.normal_rgb().numpy(), maps.depth.numpy()
            sil, face = maps.silhouette.numpy(), maps.face_mask.numpy()
            for j in range(normal.shape[0]):
                panels.append(np.concatenate([normal[j], _depth_rgb(depth[j]),
                                              _mask_rgb(sil[j], face[j])], 1))
                i = start + j
                if i % f == f // 2:          # the peak of each segment
                    key_frames[SWEEP[i // f]] = (normal[j], depth[j], sil[j], face[j])
    video = write_video(args.out / "sweep.mp4", panels, args.fps)
    written = {"video": str(video), "frames": t_total, "segments": list(SWEEP), "maps": []}
    for name, (normal, depth, sil, face) in key_frames.items():
        stem = args.out / name
        Image.fromarray(normal).save(f"{stem}_normal.png")
        Image.fromarray((depth * 1000).round().clip(0, 65535).astype(np.uint16)).save(f"{stem}_depth_mm.png")
        Image.fromarray(((sil > 0) * 127 + (face > 0) * 128).astype(np.uint8)).save(f"{stem}_mask.png")
        written["maps"].append(f"{stem}_{{normal,depth_mm,mask}}.png")
    mesh_path = args.out / "personalized_neutral.ply"
    peak = SWEEP.index("static_offsets") * f + f // 2          # Δg at full strength
    neutral = head.neutral(torch.zeros(1, params.betas.shape[1]), static[peak])
    head.to_trimesh(neutral[0]).export(mesh_path)
    written["mesh"] = str(mesh_path)
    (args.out / "summary.json").write_text(json.dumps(written, indent=2))
    return written


def _depth_rgb(depth: np.ndarray) -> np.ndarray:
    valid = depth > 0
    out = np.zeros(depth.shape, np.uint8)
    if valid.any():
        lo, hi = depth[valid].min(), depth[valid].max()
        out[valid] = (255 * (1.0 - (depth[valid] - lo) / max(hi - lo, 1e-9)) * 0.8 + 40).astype(np.uint8)
    return np.repeat(out[..., None], 3, -1)


def _mask_rgb(sil: np.ndarray, face: np.ndarray) -> np.ndarray:
    out = np.zeros(sil.shape + (3,), np.uint8)
    out[sil > 0] = (90, 90, 90)
    out[face > 0] = (255, 200, 120)
    return out
