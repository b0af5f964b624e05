"""Head representation speed: forward and condition renders, measured side by side.

    python benchmarks/head.py [--frames 64] [--repeats 5] [--skip-pytorch3d]

Prints a table and, as the last line, one JSON object with forward_fps (T=64, no autograd),
render_fps_256 and render_fps_512 (normals + depth + silhouette + face mask, torch backend,
upsampled mesh), and the torch-vs-pytorch3d CPU rasterizer ratio on the same mesh.
Targets on 2 CPU cores: forward >= 500 frames/s, render at 256^2 >= 20 frames/s.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from _report import report

warnings.filterwarnings("ignore", message=".*[Ss]parse.*")


def timed(fn, repeats: int) -> float:
    fn()                                           # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--render-frames", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--subdivision", type=int, default=1)
    ap.add_argument("--skip-pytorch3d", action="store_true")
    args = ap.parse_args()

    from models.head.resolve import synthetic_model_file
    from models.head.head_model import HeadParams, PersonalizedHead
    from models.render.camera import portrait_camera
    from models.render.conditions import render_conditions

    path = synthetic_model_file(0)
    head = PersonalizedHead.from_file(path, subdivision_levels=args.subdivision)
    coarse = PersonalizedHead.from_file(path, subdivision_levels=0)
    g = torch.Generator().manual_seed(0)
    t = args.frames
    p = HeadParams.zeros(t)
    p.expression = torch.randn(t, 100, generator=g) * 0.5
    p.jaw_pose[:, 0] = torch.rand(t, generator=g) * 0.3
    p.global_orient = torch.randn(t, 3, generator=g) * 0.2
    p.neck_pose = torch.randn(t, 3, generator=g) * 0.1
    delta_f = torch.randn(t, head.num_face_vertices, 3, generator=g) * 1e-3
    results: dict[str, float] = {"threads": torch.get_num_threads(), "fine_vertices": head.num_vertices,
                                 "fine_faces": int(head.faces.shape[0])}

    with torch.no_grad():
        sec = timed(lambda: head(p, dynamic_offsets=delta_f), args.repeats)
    results["forward_fps"] = t / sec

    pg = p.map(lambda x: x.clone())
    pg.expression.requires_grad_(True)

    def fwd_bwd():
        head(pg, dynamic_offsets=delta_f.requires_grad_(True)).vertices.square().sum().backward()
    results["forward_backward_fps"] = t / timed(fwd_bwd, max(2, args.repeats // 2))

    rt = args.render_frames
    with torch.no_grad():
        verts = head(p.map(lambda x: x[:rt] if x.shape[0] == t else x)).vertices.contiguous()
    for size in (256, 512):
        cam = portrait_camera((size, size))
        with torch.no_grad():
            sec = timed(lambda: render_conditions(verts, head.faces, cam, head.face_mask,
                                                  backend="torch"), args.repeats)
        results[f"render_fps_{size}"] = rt / sec

    if not args.skip_pytorch3d:
        # Same mesh (coarse, ~21k faces), same size, one frame each: ours vs pytorch3d's CPU path.
        with torch.no_grad():
            cv = coarse(p.map(lambda x: x[:1] if x.shape[0] == t else x)).vertices.contiguous()
        cam = portrait_camera((256, 256))
        ours = timed(lambda: render_conditions(cv, coarse.faces, cam, coarse.face_mask, backend="torch"), 3)
        ref = timed(lambda: render_conditions(cv, coarse.faces, cam, coarse.face_mask, backend="pytorch3d"), 1)
        results["pytorch3d_cpu_render_fps_256_coarse"] = 1 / ref
        results["torch_render_fps_256_coarse"] = 1 / ours
        results["torch_vs_pytorch3d_cpu"] = ref / ours

    report(results, {"forward_fps": 500, "render_fps_256": 20}, digits=2)


if __name__ == "__main__":
    main()
