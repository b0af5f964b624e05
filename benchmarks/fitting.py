"""Fitting accuracy and speed on the synthetic world (exact ground truth), on the job's path.

    python benchmarks/fitting.py [--clips 3 --frames 48 --size 256 --seed 3]

The headline (the keys ``vertex_err_pct``, ``fps``, ``jitter_ratio``, ... of the last JSON
line) is measured on the path the preprocessing job runs, with nothing taken from the truth:
the clip's rendered RGB mp4 decoded by the job's own ``decode_clip`` (``StageConfig``
defaults: 25 fps, long side <= 720), the face tracked and cropped by the job's ``FaceTracker``
(YuNet box, 256 px crop, MediaPipe landmarks mapped to iBUG-68), the intrinsics from the
20 degree field-of-view assumption (the renders were made at 22 degrees), no dense depth or
normal targets (the job ships no estimator; the fitter's photometric registration and
photometric offset stage read the crops and their validity masks), fitted by ``preprocessing.clip_fit.fit_frames``
with the job's ``StageContext`` (its head, tracker and fitter), exactly as
``preprocessing/clip_stages.py`` calls it.

Scoring. The job's fit lives in the crop camera with an assumed focal length, so its mesh
agrees with the truth only up to the monocular scale/depth ambiguity. As face-reconstruction
benchmarks score monocular fits, each frame's face-region vertices are aligned to the true
ones by a similarity (Umeyama: rotation, translation, scale; fitted on the face region) and
the mean vertex distance is reported as % of the 0.22 m head height (``vertex_err_pct``).
``jitter_ratio`` compares the fitted face vertices' mean |second difference| with the truth's
after one similarity for the whole clip (a per-frame alignment would hide jitter).
``dynamic_err_mm`` is the Δf error where the truth has detail, against the zero-Δf baseline
(``dynamic_zero_baseline_mm``); with no estimator, the job's Δf and Δg come from the
photometric stage (shape from shading on the crops). β/ψ recovery: correlation with the truth
(first 20 / 10 components).

The job's head places MediaPipe's points where they lie on this model (the calibrated
embedding shipped for the synthetic model, ``preprocessing/landmark_calibration.py``, made from
identities of another seed: none of the ones evaluated here; the 68 iBUG-like points, what
``auto`` takes; row ``job_478`` fits all 478 points of the other shipped file); MediaPipe's distance
to those points on these clips is ``mediapipe_vs_embedding_pct``.

Rows printed beside it (keys prefixed with the row name), to show what each part buys:
- ``job_model_landmarks``: the job's path with the model's own iBUG-68 definitions instead
  (``landmark_embedding: none``);
- ``job_no_registration``: the job's path without the photometric registration (stage 2b:
  shape, expression and pose against the frames' texture and shading);
- ``job_no_photometric``: the job's path with neither photometric term: landmarks alone
  (Δg = Δf = 0 then);
- ``oracle_truelmk``: the projected true landmarks + Gaussian noise of 1 % of the face width,
  true intrinsics, full frame, no dense targets, both photometric stages on the decoded frames;
- ``oracle_truelmk_no_photometric``: the same with neither photometric term;
- ``oracle_truelmk_exactmaps``: true landmarks, exact depth and normal maps rendered from the
  ground-truth mesh (no frames: the depth solver alone); 0.913 % of head height was its
  camera-space error in an earlier headline (``*_vertex_err_pct_camera``);
- ``oracle_offsets_only_dynamic_err_mm``: Δf from the offset solver alone with the true
  shape, expression and pose and exact maps;
- ``ceiling_*``: what the offsets can reach at best here (see :func:`ceilings`): the
  photometric Δf with the true geometry and camera on the decoded frames (with and without
  the pre-blur), and the true Δg's component along the normal (a height field's best).
``dynamic_vs_zero``: Δf error / zero-Δf error where the truth has detail; ``static_vs_zero``:
Δg error / zero-Δg error on the face-region vertices where the true Δg exceeds 0.2 mm;
``photometric_residual`` (mean |RGB| in [0, 1] over visible face vertices) with the fitted Δf
and ``_no_dynamic`` with Δf = 0 under the same albedo and lighting.

Speed (``fps``) is the job path's decode + track + fit, all frames over all seconds, measured
warm (one job-path fit runs first; the first fit in a process pays library start-up,
``cold_seconds``) and best of two runs per clip (the host is shared); ``fit_fps`` is the fit
alone. MediaPipe's landmarks follow their own definitions and deviate from the synthetic
ones (``mediapipe_vs_truth_pct``, median % of face width): that is part of the job path's
error. Targets: vertex_err_pct <= 1.3 and psi_corr >= 0.6 (the path-users-run issue; the
offsets issue, blocked, asked vertex_err_pct <= 0.8), dynamic_vs_zero <= 0.7, static_vs_zero <= 0.7,
jitter_ratio <= 1.3, fps >= 4 (256^2 clip).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
HEAD_HEIGHT = 0.22
PSI_COEFFS = 10                   # psi_corr scores the first ψ coefficients


def psi_corr(fitted, true) -> float:
    """`psi_corr` of one clip: the correlation of ψ[:, :PSI_COEFFS] (T, ≥ PSI_COEFFS) with the
    truth's over all its frames and those coefficients."""
    fitted, true = np.asarray(fitted)[:, :PSI_COEFFS], np.asarray(true)[:, :PSI_COEFFS]
    return float(np.corrcoef(fitted.ravel(), true.ravel())[0, 1])


def similarity(src: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Umeyama similarity of point sets (B, N, 3) -> (src aligned onto dst, scale (B,))."""
    src, dst = src.double(), dst.double()
    mu_s, mu_d = src.mean(1, keepdim=True), dst.mean(1, keepdim=True)
    xs, xd = src - mu_s, dst - mu_d
    cov = xd.transpose(1, 2) @ xs / src.shape[1]
    u, sv, vt = torch.linalg.svd(cov)
    d = torch.ones_like(sv)
    d[:, 2] = torch.sign(torch.det(u @ vt))
    rot = u @ torch.diag_embed(d) @ vt
    var_s = xs.pow(2).sum((1, 2)) / src.shape[1]
    scale = (sv * d).sum(1) / var_s
    aligned = scale[:, None, None] * xs @ rot.transpose(1, 2) + mu_d
    return aligned.float(), scale.float()


def offset_errors(fitted: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """(error, zero-offset error) in metres of offsets (M, 3), or per-frame offsets (T, M, 3):
    mean vertex distance over the face vertices where the truth exceeds 0.2 mm (in some frame)."""
    size = truth.norm(dim=-1)
    region = (size.amax(0) if truth.dim() == 3 else size) > 2e-4
    return ((fitted - truth)[..., region, :].norm(dim=-1).mean().item(),
            truth[..., region, :].norm(dim=-1).mean().item())


def true_parts(world, corpus, clip_id):
    """(HeadParams, Δg, Camera) of a synthetic clip's ground truth."""
    from preprocessing.synthetic.motion import ClipMotion
    from preprocessing.synthetic.world import clip_camera, load_clip, load_identity
    clip = load_clip(corpus, clip_id)
    params, static, _, _ = world.head_inputs(load_identity(corpus, clip_id.split("_")[0]),
                                             ClipMotion.from_arrays(clip))
    return params, static, clip_camera(clip)


def score(head, fit, tg) -> dict:
    """Metrics of one fit against the truth (see the module docstring)."""
    fid = head.face_vertex_ids
    fitted = fit.camera.to_camera(fit.vertices(head))[:, fid]
    true = tg.true_vertices_cam[:, fid]
    per_frame, scale = similarity(fitted, true)
    err = (per_frame - true).norm(dim=-1).mean().item()
    t, n = true.shape[:2]
    whole, _ = similarity(fitted.reshape(1, t * n, 3), true.reshape(1, t * n, 3))
    whole = whole.reshape(t, n, 3)
    cam_err = (fitted - true).norm(dim=-1).mean().item()
    acc = lambda v: (v[2:] - 2 * v[1:-1] + v[:-2]).norm(dim=-1).mean().item()
    b = fit.params.betas[0].numpy()
    d_err, d_zero = offset_errors(fit.dynamic_offsets, tg.true_dynamic)
    s_err, s_zero = offset_errors(fit.static_offsets[fid], torch.as_tensor(tg.true_static)[fid])
    photo = fit.qc.get("photometric_residual")
    return {"static_err_mm": s_err * 1000, "static_zero_baseline_mm": s_zero * 1000,
            "static_vs_zero": s_err / s_zero, "dynamic_vs_zero": d_err / d_zero,
            "photometric_residual": float(np.mean(photo)) if photo is not None else float("nan"),
            "photometric_residual_no_dynamic": float(np.mean(fit.qc["photometric_residual_no_dynamic"]))
            if photo is not None else float("nan"),
            "vertex_err_pct": err / HEAD_HEIGHT * 100, "vertex_err_mm": err * 1000,
            "vertex_err_pct_camera": cam_err / HEAD_HEIGHT * 100,
            "vertex_err_pct_clip_aligned": (whole - true).norm(dim=-1).mean().item() / HEAD_HEIGHT * 100,
            "align_scale": float(scale.median()),
            "jitter_ratio": acc(whole) / acc(true),
            "beta_corr": float(np.corrcoef(b[:20], tg.betas[:20])[0, 1]),
            "psi_corr": psi_corr(fit.params.expression.numpy(), tg.expression),
            "dynamic_err_mm": d_err * 1000, "dynamic_zero_baseline_mm": d_zero * 1000,
            "landmark_err_pct": float(np.nanmedian(fit.qc["landmark_error_pct"]))}


def embedded_points(head, tg) -> np.ndarray:
    """The head's (calibrated, fixed) landmark points on the true mesh, projected with the true
    camera: (T, 68, 2) pixels."""
    t = tg.true_vertices_cam.shape[0]
    faces = torch.cat([head.contour_lmk_faces[0], head.static_lmk_faces])
    bary = torch.cat([head.contour_lmk_bary[0], head.static_lmk_bary])
    pts = (tg.true_vertices_cam[:, head.lmk_face_vertices[faces]] * bary[None, :, :, None]).sum(2)
    from models.render.camera import Camera
    eye = torch.eye(3, dtype=pts.dtype).expand(t, 3, 3)
    camera = Camera.from_matrices(torch.as_tensor(tg.K, dtype=pts.dtype), eye, torch.zeros(t, 3, dtype=pts.dtype),
                                  tg.image_size)
    return camera.project(pts).numpy()


def oracle_dynamic(world, corpus, clip_id, tg, fitter):
    """Δf from the offset solver when shape, expression and pose are the true ones."""
    from preprocessing.fitting import FitInputs
    params, static, cam = true_parts(world, corpus, clip_id)
    inputs = FitInputs(landmarks=tg.landmarks, image_size=tg.image_size, K=tg.K, depth=tg.depth,
                       normals=tg.normals)
    _, dyn, _, _ = fitter.fit_offsets(params, cam, inputs, static_offsets=static)
    return offset_errors(dyn, tg.true_dynamic)[0] * 1000


def ceilings(world, corpus, clip_id, tg, frames, fitter) -> dict:
    """What the offsets could reach at best in this world, with everything else true.

    ``truegeom_dynamic_vs_zero``: the photometric Δf (the fitter's defaults) when β, ψ, jaw,
    pose, Δg and the camera are the true ones, on the decoded frames; ``truegeom_noblur_*``:
    the same without the pre-blur (the best this image model did on other seeds); and
    ``static_normal_vs_zero``: the true Δg reduced to its component along the neutral normal,
    which is what any height-field Δg (shape from shading moves surfaces along their normal)
    could match at best."""
    from preprocessing.fitting import FitInputs
    params, static, cam = true_parts(world, corpus, clip_id)
    inputs = FitInputs(landmarks=tg.landmarks, image_size=tg.image_size, K=tg.K, images=torch.as_tensor(frames))
    out = {}
    config = fitter.photometric.config
    for key, blur in (("truegeom_dynamic_vs_zero", config.blur_px), ("truegeom_noblur_dynamic_vs_zero", 0.0)):
        fitter.photometric.config = dataclasses.replace(config, blur_px=blur)
        try:
            _, dyn, _ = fitter.fit_photometric(params, cam, inputs, static, torch.zeros_like(tg.true_dynamic),
                                               fit_static=False)
        finally:
            fitter.photometric.config = config
        err, zero = offset_errors(dyn, tg.true_dynamic)
        out[key] = err / zero
    _, normal, _ = fitter.photometric.neutral_frame(params.betas, static)
    true_static = static[world.head.face_vertex_ids]
    err, zero = offset_errors((true_static * normal).sum(-1, keepdim=True) * normal, true_static)
    out["static_normal_vs_zero"] = err / zero
    return out


ROWS = {  # name -> (label in the printed table, what it is)
    "job": ("JOB PATH (headline)", "rendered RGB mp4 -> job decode -> FaceTracker crop + MediaPipe, "
            "20 deg FOV assumed, no dense targets, photometric registration and offsets on the crops, the calibrated "
            "MediaPipe landmark embedding (preprocessing/landmark_calibration.py, other identities)"),
    "job_478": ("job path, 478 points", "the same with the 478-point embedding (mediapipe478, by path): the "
                "expression stages fit all of MediaPipe's points instead of the 68 (mediapipe_ibug68, auto)"),
    "job_model_landmarks": ("job path, model lmk", "the same with the model's own iBUG-68 definitions "
                            "(landmark_embedding: none)"),
    "job_no_registration": ("job path, no reg.", "the same without the photometric registration (stage 2b)"),
    "job_no_photometric": ("job path, no photo", "the same with neither photometric term (landmarks alone)"),
    "oracle_truelmk": ("ORACLE", "true landmarks + 1 % noise, true intrinsics, no dense targets, "
                       "both photometric stages on the decoded frames"),
    "oracle_truelmk_no_photometric": ("ORACLE", "the same with neither photometric term"),
    "oracle_truelmk_exactmaps": ("ORACLE", "true landmarks + 1 % noise, true intrinsics, exact depth "
                                 "+ normal maps from the true mesh (the previous headline)"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=3, help="synthetic clips (one identity each)")
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--size", type=int, default=256, help="render size (square)")
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()

    from models.head.resolve import synthetic_model_file
    from preprocessing.clip_fit import fit_frames
    from preprocessing.clip_records import ClipItem, StageConfig
    from preprocessing.clip_stages import StageContext, decode_clip
    from preprocessing.fitting import FitConfig, Fitter, FitInputs
    from preprocessing.synthetic.world import (SyntheticWorld, WorldConfig, clip_targets, generate_corpus,
                                              load_identity)

    model = synthetic_model_file(0)
    world = SyntheticWorld(model, 1)
    # the job's defaults (configs/preprocess/local.yaml; photometric registration on) with the
    # photometric offset stage on too (off by default)
    stages = StageConfig(fit={"photometric": True})
    ctx = StageContext(model, stages, 1)         # what a job worker loads: head, tracker, fitter
    if ctx.landmark_embedding is None:
        raise RuntimeError("no calibrated landmark embedding for the synthetic model: run "
                           "python -m preprocessing.landmark_calibration")
    model_lmk_fitter = Fitter(world.head, ctx.fitter.config)     # = a worker with landmark_embedding: none
    emb = ctx.landmark_embedding
    same_points = {"landmark_weights": ctx.fitter.landmark_weights, "dense_landmarks": emb.dense_points()}
    no_photo = Fitter(ctx.head, dataclasses.replace(ctx.fitter.config, photometric=False, photo_registration=False),
                      **same_points)
    no_registration = Fitter(ctx.head, dataclasses.replace(ctx.fitter.config, photo_registration=False),
                             **same_points)
    from preprocessing.landmark_embedding import DENSE_CONVENTION, EMBEDDING_DIR, embedding_file
    ctx478 = StageContext(model, stages.model_copy(update={"landmark_embedding": str(
        EMBEDDING_DIR / embedding_file(DENSE_CONVENTION, emb.model_key))}), 1)     # a worker given the 478-point file
    oracle_fitter = Fitter(world.head, FitConfig(photometric=True))
    oracle_no_photo = Fitter(world.head, FitConfig(photometric=False, photo_registration=False))

    def job_fit(frames, fov_deg, fitter, head=None):
        clip = fit_frames(frames, head or ctx.head, ctx.tracker, fov_deg=fov_deg, fitter=fitter, estimator=None)
        if clip.fit is None:
            raise RuntimeError(f"the job's path found no usable face: {clip.status} {clip.reason}")
        return clip

    rows = {k: [] for k in ROWS}
    timing, dyn_oracle, mp_dev, emb_dev, ceiling = [], [], [], [], []
    with tempfile.TemporaryDirectory() as corpus:
        generate_corpus(corpus, WorldConfig(identities=args.clips, clips_per_identity=1, frames=args.frames,
                                            size=args.size, seed=args.seed), model, progress=False)
        clip_ids = [f"id{i:03d}_clip00" for i in range(args.clips)]
        item = lambda c: ClipItem(clip_id=c, path=f"{corpus}/clips/{c}.mp4", identity_id=c.split("_")[0])
        t0 = time.perf_counter()
        job_fit(decode_clip(item(clip_ids[0]), stages)[0], stages.fov_deg, ctx.fitter)   # warm-up
        cold = time.perf_counter() - t0
        for c in clip_ids:
            tg = clip_targets(world, corpus, c)
            tg.true_static = load_identity(corpus, c.split("_")[0]).static_offsets   # Δg truth, scoring only
            t0 = time.perf_counter()
            frames, _, _ = decode_clip(item(c), stages)
            t_decode = time.perf_counter() - t0
            runs = [job_fit(frames, stages.fov_deg, ctx.fitter) for _ in range(2)]   # best of 2 (shared host)
            clip = min(runs, key=lambda r: sum(r.seconds.values()))
            total = t_decode + sum(clip.seconds.values())
            timing.append({"seconds": total, "frames": len(frames), "fit": clip.seconds["fit"],
                           "decode": t_decode, "track": clip.seconds["track"], **clip.fit.stage_seconds})
            if len(frames) != args.frames:
                raise RuntimeError(f"decoded {len(frames)} frames, expected {args.frames}")
            rows["job"].append(score(world.head, clip.fit, tg))
            tr = clip.track
            lm = tr.landmarks68 * (tr.boxes[:, 2:3, None] / stages.crop_size) + tr.boxes[:, None, :2]
            true2d = np.load(f"{corpus}/clips/{c}.npz")["landmarks_2d"]
            width = np.linalg.norm(true2d[:, 16] - true2d[:, 0], axis=-1)[:, None]
            mp_dev.append(float(np.nanmedian(np.linalg.norm(lm - true2d, axis=-1) / width) * 100))
            emb_dev.append(float(np.nanmedian(np.linalg.norm(lm - embedded_points(ctx.head, tg), axis=-1) / width)
                                 * 100))
            rows["job_478"].append(score(world.head, job_fit(frames, stages.fov_deg, ctx478.fitter, ctx478.head).fit,
                                         tg))
            rows["job_model_landmarks"].append(score(world.head, job_fit(frames, stages.fov_deg, model_lmk_fitter,
                                                                         world.head).fit, tg))
            rows["job_no_registration"].append(score(world.head, job_fit(frames, stages.fov_deg,
                                                                          no_registration).fit, tg))
            t0 = time.perf_counter()
            plain = job_fit(frames, stages.fov_deg, no_photo)
            timing[-1]["seconds_no_photometric"] = t_decode + sum(plain.seconds.values())
            rows["job_no_photometric"].append(score(world.head, plain.fit, tg))
            lmk_only = FitInputs(landmarks=tg.landmarks, image_size=tg.image_size, K=tg.K,
                                 images=torch.as_tensor(frames))
            rows["oracle_truelmk"].append(score(world.head, oracle_fitter.fit(lmk_only), tg))
            rows["oracle_truelmk_no_photometric"].append(score(world.head, oracle_no_photo.fit(lmk_only), tg))
            exact = FitInputs(landmarks=tg.landmarks, image_size=tg.image_size, K=tg.K, depth=tg.depth,
                              normals=tg.normals)
            rows["oracle_truelmk_exactmaps"].append(score(world.head, oracle_fitter.fit(exact), tg))
            dyn_oracle.append(oracle_dynamic(world, corpus, c, tg, oracle_fitter))
            ceiling.append(ceilings(world, corpus, c, tg, frames, oracle_fitter))
            ex = rows["oracle_truelmk_exactmaps"][-1]
            print(f"  {c}: job path {rows['job'][-1]['vertex_err_pct']:.3f} %; ORACLE true landmarks + exact "
                  f"maps {ex['vertex_err_pct']:.3f} % (camera space {ex['vertex_err_pct_camera']:.3f} %)", flush=True)

    mean = lambda rs, k: float(np.mean([r[k] for r in rs]))
    print(f"{args.clips} synthetic clips x {args.frames} frames at {args.size}^2 (rendered at 22 deg FOV); "
          f"MediaPipe deviates from the synthetic landmark definitions by a median {np.mean(mp_dev):.1f} % "
          f"of face width, from the calibrated embedding's points by {np.mean(emb_dev):.1f} %")
    print("vertex error: face region, per-frame similarity alignment, % of 0.22 m head height")
    cols = {"vertex_err_pct": "err_%", "vertex_err_mm": "err_mm", "vertex_err_pct_camera": "cam_err_%",
            "vertex_err_pct_clip_aligned": "clip_al_%", "align_scale": "scale", "jitter_ratio": "jitter",
            "beta_corr": "beta_r", "psi_corr": "psi_r", "dynamic_err_mm": "dyn_mm", "dynamic_vs_zero": "dyn/0",
            "static_vs_zero": "stat/0", "photometric_residual": "photo_r", "landmark_err_pct": "lmk_%"}
    print(f"{'row':<26}{'kind':<21}" + "".join(f"{c:>10}" for c in cols.values()))
    for name, (label, what) in ROWS.items():
        camera_ok = name.startswith("oracle_truelmk")
        vals = [mean(rows[name], k) if (k != "vertex_err_pct_camera" or camera_ok) else float("nan")
                for k in cols]
        print(f"{name:<26}{label:<21}" + "".join(f"{v:>10.3f}" for v in vals))
    for name, (label, what) in ROWS.items():
        print(f"  {name}: {label.lower()}: {what}")
    print("  err_%: per-frame similarity-aligned (the headline metric); cam_err_%: camera space, no "
          "alignment (only where the camera is the true one); clip_al_%: one similarity per clip; "
          "scale: per-frame alignment scale; jitter: fitted / true mean |2nd difference| after one "
          "similarity per clip; beta_r / psi_r: correlation with the true beta (20) / psi (10); "
          "dyn_mm: dynamic-offset error where the truth has detail; lmk_%: median landmark error "
          "against the fitter's own 2D targets")
    n_frames, n_sec = sum(t["frames"] for t in timing), sum(t["seconds"] for t in timing)
    fps = n_frames / n_sec
    fit_fps = n_frames / sum(t["fit"] for t in timing)
    fps_plain = n_frames / sum(t["seconds_no_photometric"] for t in timing)
    print(f"job path speed (warm, best of 2 per clip): {fps:.2f} frames/s decode + track + fit "
          f"({fit_fps:.2f} fit alone); mean seconds per clip: "
          + ", ".join(f"{k}={np.mean([t[k] for t in timing]):.2f}" for k in timing[0] if k != "frames"))
    print(f"dynamic offsets: job {mean(rows['job'], 'dynamic_err_mm'):.3f} mm; ORACLE exact maps "
          f"{mean(rows['oracle_truelmk_exactmaps'], 'dynamic_err_mm'):.3f} mm; ORACLE offset solver alone "
          f"(true parametric part) {np.mean(dyn_oracle):.3f} mm; zero baseline "
          f"{mean(rows['job'], 'dynamic_zero_baseline_mm'):.3f} mm")
    print("CEILINGS (everything but the offsets true): photometric Δf / zero "
          + ", ".join(f"{k} {mean(ceiling, k):.3f}" for k in ceiling[0])
          + " (per clip: " + "; ".join(", ".join(f"{v:.3f}" for v in x.values()) for x in ceiling) + ")")

    r3 = lambda x: round(float(x), 3)
    j = rows["job"]
    out = {
        "vertex_err_pct": r3(mean(j, "vertex_err_pct")),
        "vertex_err_mm": r3(mean(j, "vertex_err_mm")),
        "fps": round(fps, 2),
        "fit_fps": round(fit_fps, 2),
        "jitter_ratio": r3(mean(j, "jitter_ratio")),
        "fps_no_photometric": round(fps_plain, 2),
        "dynamic_vs_zero": r3(mean(j, "dynamic_vs_zero")),
        "static_vs_zero": r3(mean(j, "static_vs_zero")),
        "photometric_residual": round(mean(j, "photometric_residual"), 5),
        "photometric_residual_no_dynamic": round(mean(j, "photometric_residual_no_dynamic"), 5),
        "vertex_err_pct_clip_aligned": r3(mean(j, "vertex_err_pct_clip_aligned")),
        "align_scale": r3(mean(j, "align_scale")),
        "beta_corr": r3(mean(j, "beta_corr")), "psi_corr": r3(mean(j, "psi_corr")),
        "dynamic_err_mm": round(mean(j, "dynamic_err_mm"), 4),
        "dynamic_zero_baseline_mm": round(mean(j, "dynamic_zero_baseline_mm"), 4),
        "landmark_err_pct": r3(mean(j, "landmark_err_pct")),
        **{f"ceiling_{k}": r3(mean(ceiling, k)) for k in ceiling[0]},
        "mediapipe_vs_truth_pct": round(float(np.mean(mp_dev)), 2),
        "mediapipe_vs_embedding_pct": round(float(np.mean(emb_dev)), 2),
        "stage_seconds": {k: r3(np.mean([x[k] for x in timing]))
                          for k in timing[0] if k not in ("seconds", "frames", "fit")},
        "cold_seconds": round(cold, 2),
        "path": {"video": "rendered RGB mp4, job decode_clip", "landmarks": "FaceTracker crop + MediaPipe, "
                 f"calibrated embedding {emb.convention} (other identities, seed 1001)",
                 "fov_deg": stages.fov_deg, "dense_targets": None,
                 "photometric": "registration + offsets, crops + validity masks"},
        "metric": "face-region vertex error after per-frame similarity (Umeyama) alignment, % of 0.22 m",
    }
    for name in ROWS:
        if name == "job":
            continue
        rs = rows[name]
        out[f"{name}_dynamic_vs_zero"] = r3(mean(rs, "dynamic_vs_zero"))
        out[f"{name}_static_vs_zero"] = r3(mean(rs, "static_vs_zero"))
        out[f"{name}_vertex_err_pct"] = r3(mean(rs, "vertex_err_pct"))
        if name.startswith("oracle_truelmk"):
            out[f"{name}_vertex_err_pct_camera"] = r3(mean(rs, "vertex_err_pct_camera"))
        out[f"{name}_jitter_ratio"] = r3(mean(rs, "jitter_ratio"))
        out[f"{name}_psi_corr"] = r3(mean(rs, "psi_corr"))
        out[f"{name}_beta_corr"] = r3(mean(rs, "beta_corr"))
        out[f"{name}_dynamic_err_mm"] = round(mean(rs, "dynamic_err_mm"), 4)
    out["oracle_offsets_only_dynamic_err_mm"] = round(float(np.mean(dyn_oracle)), 4)
    out["clips"], out["frames"], out["size"] = args.clips, args.frames, args.size
    out["targets"] = {"vertex_err_pct": 1.3, "psi_corr": 0.6, "dynamic_vs_zero": 0.7, "static_vs_zero": 0.7,
                      "jitter_ratio": 1.3, "fps": 4.0}
    print(json.dumps(out))
    from _report import write_result           # benchmarks/results/fitting.json
    write_result(out)


if __name__ == "__main__":
    main()
