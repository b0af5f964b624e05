"""Where the tracker's points lie on a head model: a landmark embedding calibrated on synthetic renders
(the 68 iBUG-like points, the default, or all 478 MediaPipe points, ``--convention mediapipe478``).

The tracker's 68 points are MediaPipe face-mesh points chosen to resemble iBUG-68
(``tracking.MEDIAPIPE_TO_IBUG68``), but they keep MediaPipe's own definitions: on the synthetic
renders they sit a median 4.2 % of the face width away from the model's iBUG-68 points, 9-18 %
on the jaw contour (``benchmarks/fitting.py``, ``mediapipe_vs_truth_pct``). Fitting the model's
definitions to them pulls the mesh millimetres off the image. MediaPipe's points are fixed
points of its own face mesh, contour included, so each has a fixed counterpart on the head's
surface. :func:`calibrate` finds it: for every one of the points, the surface point (a
face of the model and barycentric coordinates) whose projection follows the detections most
closely over synthetic clips with exact posed meshes and cameras. The clips are rendered for
calibration only (their own seed: ``--seed`` must differ from any benchmark's, which use 3 and
0), so no evaluated identity is seen.

The job's head uses the embedding found for its model (``StageConfig.landmark_embedding``:
``auto`` looks for the file made for this model's geometry, see
:func:`preprocessing.landmark_embedding.resolve_embedding`).
The synthetic model's file ships in ``preprocessing/landmark_embeddings/``; for the real SMPL-X
model run::

    python -m preprocessing.landmark_calibration --model /path/SMPLX_NEUTRAL.npz \\
        --out preprocessing/landmark_embeddings/   [--identities 12 --frames 24 --seed 1001]
        [--convention mediapipe_ibug68 | mediapipe478]

(the synthetic world renders any SMPL-X-format model). File format: see
:mod:`preprocessing.landmark_embedding` (which reads it; :meth:`LandmarkEmbedding.save` writes it).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.render.camera import Camera

from .landmark_embedding import CONVENTION, CONVENTIONS, DENSE_CONVENTION, EMBEDDING_DIR, LandmarkEmbedding, \
    ibug68_rows, model_key

__all__ = ["CONVENTION", "DENSE_CONVENTION", "EMBEDDING_DIR", "LandmarkEmbedding", "Observation", "calibrate",
           "collect", "main", "model_definition_residual", "model_key"]


# ----------------------------------------------------------------------------------------------
@dataclass
class Observation:
    """One clip: the exact posed vertices in camera space (T, N, 3) of the head's fine mesh,
    its camera, the detected points (T, L, 2) in the same image's pixels (NaN where none; L of
    the convention), the face width per frame (T,) in pixels."""
    vertices_cam: torch.Tensor
    camera: Camera
    detected: torch.Tensor
    face_width: torch.Tensor
    model_points: torch.Tensor        # (T, 68, 2) the model's own iBUG-68 points, projected
    clip_id: str = ""                 # the clip in the calibration corpus (its ground truth: ``load_clip``)


def _candidate_faces(head, rings: int = 2) -> torch.Tensor:
    """Sub-mesh faces on or within ``rings`` vertex rings of the face region."""
    tri = head.lmk_face_vertices                                 # (F_sub, 3) fine vertex ids
    mask = torch.zeros(head.num_vertices, dtype=torch.bool)
    mask[head.face_vertex_ids.cpu()] = True
    faces = head.faces.cpu()
    for _ in range(rings):
        mask[faces[mask[faces].any(1)].reshape(-1)] = True
    return torch.nonzero(mask[tri.cpu()].any(1))[:, 0]


def _bary_grid(n: int) -> torch.Tensor:
    pts = [(i / n, j / n, (n - i - j) / n) for i in range(n + 1) for j in range(n + 1 - i)]
    return torch.tensor(pts, dtype=torch.float32)


def _median_distances(head, obs: list[Observation], faces: torch.Tensor, bary: torch.Tensor,
                      which: torch.Tensor | None = None, chunk: int = 512) -> torch.Tensor:
    """Median over all frames of |projection - detection| / face width for candidate surface
    points (face centroids (C,), bary (C, 3)) against the landmarks ``which`` (default all): (C, L)."""
    tri = head.lmk_face_vertices[faces]                          # (C, 3)
    which = torch.arange(obs[0].detected.shape[1]) if which is None else which
    out = []
    for s in range(0, len(faces), chunk):
        t_, b_ = tri[s:s + chunk], bary[s:s + chunk]
        per_clip = []
        for o in obs:
            p = (o.vertices_cam[:, t_] * b_[None, :, :, None]).sum(2)           # (T, c, 3)
            uv = o.camera.project(p)                                              # (T, c, 2)
            d = (uv[:, :, None] - o.detected[:, None, which]).norm(dim=-1) / o.face_width[:, None, None]
            per_clip.append(d)                                                    # (T, c, L)
        d = torch.cat(per_clip, 0)
        out.append(torch.nanmedian(d, 0).values)
    return torch.cat(out)


def calibrate(head, obs: list[Observation], model, top_faces: int = 8, grid: int = 10,
              convention: str = CONVENTION) -> LandmarkEmbedding:
    """The embedding of the detected points (the convention's L) on ``head`` (built without one)
    from ``obs``: per point, the face centroids are ranked first, then a barycentric grid on the
    best ``top_faces`` faces picks the point (see the module docstring)."""
    points = CONVENTIONS[convention]
    if obs[0].detected.shape[1] != points:
        raise ValueError(f"{convention} has {points} points, the observations {obs[0].detected.shape[1]}")
    with torch.no_grad():
        cand = _candidate_faces(head, rings=2 if points == 68 else 4)      # MediaPipe's mesh reaches the brow
        centroid = torch.full((len(cand), 3), 1 / 3)
        coarse = _median_distances(head, obs, cand, centroid)                    # (C, L)
        best = coarse.topk(top_faces, dim=0, largest=False).indices.T            # (L, top)
        grid_b = _bary_grid(grid)
        faces_out, bary_out, resid = [], [], []
        for k in range(points):
            f = cand[best[k]].repeat_interleave(len(grid_b))
            b = grid_b.repeat(top_faces, 1)
            d = _median_distances(head, obs, f, b, which=torch.tensor([k]))[:, 0]
            i = int(d.argmin())
            faces_out.append(int(head.submesh_face_ids[f[i]]))
            bary_out.append(b[i].numpy())
            resid.append(float(d[i]) * 100)
        frames = sum(o.detected.shape[0] for o in obs)
        return LandmarkEmbedding(faces=np.array(faces_out), bary=np.stack(bary_out), model_key=model_key(model),
                                 residual_pct=np.array(resid, np.float32),
                                 model_residual_pct=model_definition_residual(obs, convention),
                                 frames=frames, convention=convention)


def model_definition_residual(obs: list[Observation], convention: str = CONVENTION) -> np.ndarray:
    """Median distance (% of face width) per point between the detections and the model's own
    iBUG-68 landmarks (the clips' projected true landmarks, contour following the yaw); NaN for
    the points of the convention that are not among the 68."""
    rows = ibug68_rows(convention)
    d = torch.cat([(o.model_points - o.detected[:, rows]).norm(dim=-1) / o.face_width[:, None] for o in obs])
    out = np.full(CONVENTIONS[convention], np.nan, np.float32)
    out[rows] = (torch.nanmedian(d, 0).values * 100).numpy()
    return out


# ----------------------------------------------------------------------------------------------
def collect(model_path: str | Path, work: str | Path, identities: int = 12, frames: int = 24, size: int = 256,
            seed: int = 1001, progress: bool = True, convention: str = CONVENTION) -> list[Observation]:
    """Render a synthetic calibration corpus with ``model_path`` and detect its points the way
    the job does (decode, ``FaceTracker`` crop + MediaPipe), mapped back to frame pixels: the
    68 (``mediapipe_ibug68``) or all 478 (``mediapipe478``)."""
    from tqdm import tqdm

    from .clip_records import ClipItem, StageConfig
    from .clip_stages import decode_clip
    from .synthetic.motion import ClipMotion
    from .synthetic.world import SyntheticWorld, WorldConfig, clip_camera, generate_corpus, load_clip, load_identity
    from .tracking import FaceTracker

    work = Path(work)
    generate_corpus(work, WorldConfig(identities=identities, clips_per_identity=1, frames=frames, size=size,
                                      seed=seed), model_path, progress=progress)
    world = SyntheticWorld(model_path, 1)
    stages = StageConfig()
    tracker = FaceTracker(crop_size=stages.crop_size)
    obs = []
    for i in tqdm(range(identities), desc="detect", disable=not progress):
        clip_id = f"id{i:03d}_clip00"
        item = ClipItem(clip_id=clip_id, path=str(work / "clips" / f"{clip_id}.mp4"), identity_id=f"id{i:03d}")
        rgb, _, _ = decode_clip(item, stages)
        track = tracker.track(rgb)
        if track.landmarks68 is None:
            continue
        found = track.landmarks68 if convention == CONVENTION else track.landmarks478[..., :2]
        lm = found * (track.boxes[:, 2:3, None] / stages.crop_size) + track.boxes[:, None, :2]
        lm[~track.detected] = np.nan
        clip = load_clip(work, clip_id)
        params, static, dynamic, _ = world.head_inputs(load_identity(work, item.identity_id),
                                                       ClipMotion.from_arrays(clip))
        camera = clip_camera(clip)
        with torch.no_grad():
            vertices_cam = camera.to_camera(world.head(params, static, dynamic).vertices)
        true2d = clip["landmarks_2d"]
        width = np.linalg.norm(true2d[:, 16] - true2d[:, 0], axis=-1)
        obs.append(Observation(vertices_cam=vertices_cam.float(), camera=camera,
                               detected=torch.as_tensor(lm, dtype=torch.float32),
                               face_width=torch.as_tensor(width, dtype=torch.float32),
                               model_points=torch.as_tensor(true2d, dtype=torch.float32), clip_id=clip_id))
    if not obs:
        raise RuntimeError("no calibration clip had a detected face")
    return obs


def main(argv: list[str] | None = None) -> None:
    import tempfile

    from models.head.head_model import PersonalizedHead
    from models.head.smplx_file import load_smplx_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="SMPL-X-format .npz (default: the synthetic model)")
    ap.add_argument("--out", default=str(EMBEDDING_DIR), help="file or folder (named by the model key)")
    ap.add_argument("--identities", type=int, default=12)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1001, help="calibration identities' seed (not a benchmark's)")
    ap.add_argument("--convention", default=CONVENTION, choices=list(CONVENTIONS),
                    help="the 68 iBUG-like points (what `auto` takes) or all 478 MediaPipe points (used by path)")
    args = ap.parse_args(argv)
    if args.model is None:
        from models.head.resolve import synthetic_model_file
        args.model = str(synthetic_model_file(0))
    model = load_smplx_model(args.model)
    head = PersonalizedHead(model, subdivision_levels=1)
    with tempfile.TemporaryDirectory() as work:
        obs = collect(args.model, work, args.identities, args.frames, args.size, args.seed,
                      convention=args.convention)
    emb = calibrate(head, obs, model, convention=args.convention)
    path = emb.save(args.out)
    rows = ibug68_rows(emb.convention)
    summary = {"out": str(path), "convention": emb.convention, "model_key": emb.model_key, "frames": emb.frames,
               "median_residual_pct": round(float(np.median(emb.residual_pct)), 2),
               "median_residual_pct_68": round(float(np.median(emb.residual_pct[rows])), 2),
               "median_model_definition_residual_pct": round(float(np.nanmedian(emb.model_residual_pct)), 2),
               "contour_residual_pct": round(float(np.median(emb.residual_pct[rows[:17]])), 2),
               "contour_model_definition_residual_pct": round(float(np.median(emb.model_residual_pct[rows[:17]])), 2),
               "weights_at_floor": int((emb.dense_weights() <= 0.05).sum())}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
