"""The synthetic talking-head world: identities × clips rendered to mp4 with exact truth.

Layout written by :func:`generate_corpus`::

    DIR/world.json                 config, model file + sha1, conventions, identities, splits
    DIR/world_arrays.npz           face_vertex_ids (the face-region definition), fine faces
    DIR/identities/<id>.npz        betas, age, Δg, detail basis, albedo, ...
    DIR/clips/<clip_id>.mp4        H.264 video
    DIR/clips/<clip_id>.npz        per-frame SMPL-X parameters, camera, 2D/3D landmarks,
                                   detail coefficients, lighting, background
    DIR/manifest.parquet           a row per clip: identity, split (by identity), paths
    DIR/pairs.parquet              cross-identity (driver clip, target identity) pairs

The true Δf of clip frames is ``detail_coefficients(ψ, jaw) @ detail_basis(identity)`` (zero
at a neutral face); :func:`true_dynamic_offsets` gives it for any driver clip and target
identity. Fitted Δf is zero-mean over a clip, so compare after centring both.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.head.head_model import HeadParams, PersonalizedHead
from models.head.smplx_file import load_smplx_model
from models.render.camera import Camera
from models.render.conditions import render_conditions
from models.render.shading import Lighting, shade

from ..files import file_digest
from .identity import DETAIL_COMPONENTS, Identity, RestInfo, detail_coefficients, sample_identity
from .motion import ClipMotion, sample_clip_motion

WORLD_VERSION = 1
SPLITS = ("train", "val", "test")


@dataclass
class WorldConfig:
    identities: int = 8
    clips_per_identity: int = 2
    frames: int = 48
    size: int = 128
    fps: float = 25.0
    seed: int = 0
    subdivision: int = 1
    crf: int = 8                  # near-lossless H.264: ~43 dB PSNR against the raw frames
    pix_fmt: str = "yuv444p"      # full-resolution colour (4:2:0 alone costs ~8 dB PSNR here)
    split_fractions: tuple[float, float, float] = (0.75, 0.125, 0.125)
    pairs_per_clip: int = 2
    camera_distance: float = 0.75
    fov_deg: float = 22.0


class SyntheticWorld:
    """The head model plus what every identity shares; renders clips."""

    def __init__(self, model_path: str | os.PathLike, subdivision: int = 1) -> None:
        self.model_path = Path(model_path)
        data = load_smplx_model(self.model_path)
        if "synthetic_part" not in data.extras:
            raise ValueError(f"{model_path} is not a synthetic model (no part labels); the "
                             "synthetic world needs `expportrait head synth-model` output")
        self.head = PersonalizedHead(data, subdivision_levels=subdivision)
        self.rest = RestInfo.from_head(self.head, data.extras["synthetic_part"])

    def identity(self, identity_id: str, rng: np.random.Generator) -> Identity:
        return sample_identity(identity_id, self.rest, rng)

    def head_inputs(self, identity: Identity, motion: ClipMotion):
        t = len(motion.expression)
        f32 = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)
        params = HeadParams(betas=f32(identity.betas)[None], expression=f32(motion.expression),
                            global_orient=f32(motion.global_orient), neck_pose=f32(motion.neck_pose),
                            head_pose=f32(motion.head_pose), jaw_pose=f32(motion.jaw_pose),
                            leye_pose=f32(motion.leye_pose), reye_pose=f32(motion.reye_pose),
                            transl=torch.zeros(t, 3))
        coeffs = detail_coefficients(motion.expression, motion.jaw_pose)
        dynamic = np.einsum("tc,cnk->tnk", coeffs, identity.detail_basis)
        return params, f32(identity.static_offsets), f32(dynamic), coeffs

    def camera(self, motion: ClipMotion, size: int, distance: float, fov_deg: float) -> Camera:
        t = len(motion.camera_offset)
        target = torch.tensor([[0.0, 0.185, 0.0]]).expand(t, 3)
        eye = target + torch.tensor([[0.0, 0.0, distance]]) + torch.as_tensor(
            motion.camera_offset, dtype=torch.float32)
        return Camera.look_at(eye, target, (size, size), fov_deg)

    def render(self, identity: Identity, motion: ClipMotion, camera: Camera, lighting: Lighting,
               background: np.ndarray):
        """Frames (T, H, W, 3) uint8, landmarks 2D (T, 68, 2) and 3D (T, 68, 3), coefficients."""
        params, static, dynamic, coeffs = self.head_inputs(identity, motion)
        frames, out = self.render_head(identity, params, static, dynamic, camera, lighting, background)
        with torch.no_grad():
            lm2d = camera.project(camera.to_camera(out.landmarks))
        return frames, lm2d.numpy(), out.landmarks.numpy(), coeffs

    def render_head(self, identity: Identity, params: HeadParams, static: torch.Tensor, dynamic: torch.Tensor,
                    camera: Camera, lighting: Lighting, background: np.ndarray):
        """Frames (T, H, W, 3) uint8 of ``identity``'s albedo on the head posed by ``params`` with
        Δg ``static`` and Δf ``dynamic``, and the head model's output."""
        with torch.no_grad():
            out = self.head(params, static_offsets=static, dynamic_offsets=dynamic)
            maps = render_conditions(out.vertices, self.head.faces, camera, self.head.face_mask,
                                     vertex_colors=torch.as_tensor(identity.albedo).float() / 255.0)
            rgb = shade(maps, lighting, torch.as_tensor(background).float() / 255.0)
        return (rgb * 255.0).round().to(torch.uint8).numpy(), out


def sample_lighting(rng: np.random.Generator) -> Lighting:
    tint = rng.uniform(0.9, 1.1, 3)
    direction = np.array([rng.uniform(-0.7, 0.7), rng.uniform(-0.8, 0.2), -1.0])
    return Lighting(ambient=torch.as_tensor(rng.uniform(0.35, 0.55) * tint, dtype=torch.float32),
                    diffuse=torch.as_tensor(rng.uniform(0.5, 0.75) * tint, dtype=torch.float32),
                    direction=torch.as_tensor(direction / np.linalg.norm(direction), dtype=torch.float32))


def sample_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A soft two-colour gradient with low-frequency blobs, uint8 (H, W, 3)."""
    y, x = np.mgrid[0:size, 0:size] / size
    a, b = rng.uniform(0.1, 0.9, 3), rng.uniform(0.1, 0.9, 3)
    ang = rng.uniform(0, 2 * np.pi)
    w = (np.cos(ang) * x + np.sin(ang) * y)
    w = (w - w.min()) / max(np.ptp(w), 1e-9)
    img = a * (1 - w[..., None]) + b * w[..., None]
    for _ in range(4):
        c, s = rng.uniform(0, 1, 2), rng.uniform(0.1, 0.3)
        img += rng.uniform(-0.12, 0.12, 3) * np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2) / (2 * s * s))[..., None]
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def _rng(seed: int, *keys: int) -> np.random.Generator:
    """Independent streams per (identity, clip): adding identities never changes existing ones."""
    return np.random.default_rng([seed, *keys])


def _split_of(num_identities: int, fractions, seed: int) -> list[str]:
    order = _rng(seed, 99).permutation(num_identities)
    n_val = max(1, int(round(fractions[1] * num_identities))) if num_identities >= 3 else 0
    n_test = max(1, int(round(fractions[2] * num_identities))) if num_identities >= 3 else 0
    split = ["train"] * num_identities
    for k in order[:n_val]:
        split[k] = "val"
    for k in order[n_val:n_val + n_test]:
        split[k] = "test"
    return split


@dataclass
class CorpusResult:
    out: Path
    clips: int
    frames: int
    seconds: float
    raw_frames: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def frames_per_second(self) -> float:
        return self.frames / max(self.seconds, 1e-9)


def generate_corpus(out: str | os.PathLike, config: WorldConfig, model_path: str | os.PathLike,
                    keep_frames: bool = False, progress: bool = True) -> CorpusResult:
    """Write the synthetic corpus (see the module docstring). Deterministic in ``config.seed``."""
    import pandas as pd
    from tqdm import tqdm

    from preprocessing.video import write_video

    out = Path(out)
    (out / "identities").mkdir(parents=True, exist_ok=True)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    world = SyntheticWorld(model_path, config.subdivision)
    splits = _split_of(config.identities, config.split_fractions, config.seed)
    rows, identities, raw = [], {}, {}
    total = config.identities * config.clips_per_identity
    bar = tqdm(total=total, desc="synthetic clips", unit="clip", disable=not progress)
    for i in range(config.identities):
        identity_id = f"id{i:03d}"
        ident = world.identity(identity_id, _rng(config.seed, 1, i))
        ident = Identity.from_arrays(identity_id, ident.to_arrays())   # render what is saved
        identities[identity_id] = ident
        np.savez(out / "identities" / f"{identity_id}.npz", **ident.to_arrays())
        for c in range(config.clips_per_identity):
            clip_id = f"{identity_id}_clip{c:02d}"
            rng = _rng(config.seed, 2, i, c)
            motion = sample_clip_motion(rng, config.frames, config.fps)
            motion = ClipMotion(**{k: v.astype(np.float32) for k, v in asdict(motion).items()})
            camera = world.camera(motion, config.size, config.camera_distance, config.fov_deg)
            lighting = sample_lighting(rng)
            background = sample_background(rng, config.size)
            frames, lm2d, lm3d, coeffs = world.render(ident, motion, camera, lighting, background)
            write_video(out / "clips" / f"{clip_id}.mp4", frames, config.fps, crf=config.crf,
                        pix_fmt=config.pix_fmt)
            np.savez(out / "clips" / f"{clip_id}.npz",
                     **asdict(motion),
                     transl=np.zeros((config.frames, 3), np.float32),
                     camera_K=camera.K.numpy(), camera_R=camera.R.numpy(), camera_t=camera.t.numpy(),
                     image_size=np.array([config.size, config.size]), fps=np.float32(config.fps),
                     landmarks_2d=lm2d.astype(np.float32), landmarks_3d=lm3d.astype(np.float32),
                     detail_coefficients=coeffs.astype(np.float32),
                     light_ambient=lighting.ambient.numpy(), light_diffuse=lighting.diffuse.numpy(),
                     light_direction=lighting.direction.numpy(), background=background)
            if keep_frames:
                raw[clip_id] = frames
            rows.append({"clip_id": clip_id, "identity_id": identity_id, "split": splits[i],
                         "video": f"clips/{clip_id}.mp4", "ground_truth": f"clips/{clip_id}.npz",
                         "identity_file": f"identities/{identity_id}.npz", "frames": config.frames,
                         "fps": config.fps, "width": config.size, "height": config.size,
                         "age": ident.age})
            bar.update(1)
    bar.close()
    manifest = pd.DataFrame(rows)
    manifest.to_parquet(out / "manifest.parquet", index=False)
    _pairs(manifest, config).to_parquet(out / "pairs.parquet", index=False)
    np.savez(out / "world_arrays.npz", face_vertex_ids=world.head.face_vertex_ids.numpy(),
             faces=world.head.faces.numpy().astype(np.int32))
    meta = {
        "version": WORLD_VERSION, "config": asdict(config),
        "model_file": str(Path(model_path).resolve()), "model_sha1": file_digest(model_path),
        "num_vertices": world.head.num_vertices, "num_face_vertices": world.head.num_face_vertices,
        "detail_components": list(DETAIL_COMPONENTS),
        "face_region": "face_vertex_ids in world_arrays.npz: fine vertices inside the frontal "
                       "jaw-contour outline closed over the forehead, in front of the contour "
                       "ends, not eyeballs (models/head/regions.py)",
        "dynamic_offsets": "detail_coefficients @ detail_basis; zero at a neutral face",
        "conventions": {"units": "metres", "world": "y up, z out of the face, x subject's left",
                        "camera": "OpenCV: x right, y down, z forward; pixel centre (j, i)",
                        "landmarks": "iBUG-68"},
        "identities": {k: {"split": splits[i], "age": identities[k].age}
                       for i, k in enumerate(identities)},
    }
    (out / "world.json").write_text(json.dumps(meta, indent=2))
    seconds = time.perf_counter() - start
    return CorpusResult(out=out, clips=len(rows), frames=len(rows) * config.frames,
                        seconds=seconds, raw_frames=raw)


def _pairs(manifest, config: WorldConfig):
    import pandas as pd
    ids = manifest.groupby("identity_id")["split"].first()
    rows = []
    for r in manifest.itertuples():
        same = [i for i, s in ids.items() if s == r.split and i != r.identity_id]
        pool = same or [i for i in ids.index if i != r.identity_id]
        rng = _rng(config.seed, 3, int(r.identity_id[2:]), int(r.clip_id[-2:]))
        for target in rng.permutation(pool)[:config.pairs_per_clip]:
            rows.append({"driver_clip_id": r.clip_id, "driver_identity_id": r.identity_id,
                         "target_identity_id": str(target), "split": r.split})
    return pd.DataFrame(rows, columns=["driver_clip_id", "driver_identity_id",
                                       "target_identity_id", "split"])


# ------------------------------------------------------------------------------------------
# reading a corpus back
def load_identity(corpus: str | os.PathLike, identity_id: str) -> Identity:
    with np.load(Path(corpus) / "identities" / f"{identity_id}.npz") as a:
        return Identity.from_arrays(identity_id, {k: a[k] for k in a.files})


def load_clip(corpus: str | os.PathLike, clip_id: str) -> dict[str, np.ndarray]:
    with np.load(Path(corpus) / "clips" / f"{clip_id}.npz") as a:
        return {k: a[k] for k in a.files}


def clip_camera(clip: dict[str, np.ndarray]) -> Camera:
    """The per-frame cameras saved with a clip."""
    size = int(clip["image_size"][0])
    return Camera.from_matrices(clip["camera_K"], clip["camera_R"], clip["camera_t"], (size, size))


def true_dynamic_offsets(corpus: str | os.PathLike, driver_clip_id: str,
                         target_identity_id: str) -> np.ndarray:
    """The exact Δf (T, N_face, 3) of the target identity performing the driver's expressions."""
    clip = load_clip(corpus, driver_clip_id)
    basis = load_identity(corpus, target_identity_id).detail_basis
    coeffs = detail_coefficients(clip["expression"], clip["jaw_pose"])
    return np.einsum("tc,cnk->tnk", coeffs, basis)


def rerender_clip(world: SyntheticWorld, corpus: str | os.PathLike, clip_id: str) -> np.ndarray:
    """Render a clip again from its saved ground truth alone (frames, uint8)."""
    clip = load_clip(corpus, clip_id)
    identity = load_identity(corpus, clip_id.split("_")[0])
    motion = ClipMotion.from_arrays(clip)
    camera = clip_camera(clip)
    lighting = Lighting(ambient=torch.as_tensor(clip["light_ambient"]),
                        diffuse=torch.as_tensor(clip["light_diffuse"]),
                        direction=torch.as_tensor(clip["light_direction"]))
    frames, _, _, _ = world.render(identity, motion, camera, lighting, clip["background"])
    return frames


@dataclass
class DrivenClip:
    """A source identity performing a driver clip's motion, with its exact truth."""

    frames: np.ndarray                # (T, S, S, 3) uint8
    params: HeadParams                # the source's β; the driver's ψ and jaw; retargeted pose
    static_offsets: torch.Tensor      # (N, 3) the source identity's Δg
    dynamic_offsets: torch.Tensor     # (T, N_face, 3) the Δf the world gives the source for the driver's ψ, jaw
    camera: Camera                    # (T) at side S
    driver_frames: np.ndarray         # (T,) the driver's frame indices


def driven_clip(world: SyntheticWorld, corpus: str | os.PathLike, source_clip_id: str, driver_clip_id: str,
                frames=None, size: int | None = None, source_frame: int = 0) -> DrivenClip:
    """The identity of ``source_clip_id`` driven by ``driver_clip_id``'s motion, rendered with exact
    truth: the driver's (ψ, jaw); its head, neck and eye motion since its frame 0 on the source's
    pose at ``source_frame``, seen by the source's camera there moved as the driver's camera moved
    (the retargeting convention of :mod:`models.transfer.retarget`, which reenactment applies to
    fitted clips); the source's Δg, lighting and background; the Δf the world gives the source
    identity for the driver's expressions (:func:`true_dynamic_offsets`). ``frames``: driver frame
    indices to render (None: all); ``size``: the render's side (None: the corpus's; cameras
    resized, the background resampled). A clip driving itself is the clip (:func:`rerender_clip`)."""
    from models.transfer.inputs import head_params
    from models.transfer.retarget import EYE_JOINTS, POSE_JOINTS, retarget_camera, retarget_pose

    src, drv = load_clip(corpus, source_clip_id), load_clip(corpus, driver_clip_id)
    identity = load_identity(corpus, source_clip_id.split("_")[0])
    ids = np.arange(len(drv["expression"])) if frames is None else np.asarray(frames, np.int64)
    f32 = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)      # noqa: E731
    joints = POSE_JOINTS + EYE_JOINTS + ("transl",)
    pose = retarget_pose({k: f32(drv[k]) for k in joints}, {k: f32(src[k][source_frame]) for k in joints})
    R, t = retarget_camera(f32(drv["camera_R"]), f32(drv["camera_t"]), f32(src["camera_R"][source_frame]),
                           f32(src["camera_t"][source_frame]))
    arrays = {k: v.numpy()[ids] for k, v in pose.items()}
    arrays.update(expression=np.asarray(drv["expression"], np.float32)[ids],
                  jaw_pose=np.asarray(drv["jaw_pose"], np.float32)[ids], betas=identity.betas)
    params = head_params(arrays)
    native = int(src["image_size"][0])
    K = f32(np.repeat(src["camera_K"][source_frame][None], len(ids), 0))
    camera = Camera.from_matrices(K, R[ids], t[ids], (native, native)).resized(size or native)
    background = src["background"]
    if size and size != native:
        import cv2
        background = cv2.resize(background, (size, size), interpolation=cv2.INTER_LINEAR)
    lighting = Lighting(ambient=torch.as_tensor(src["light_ambient"]), diffuse=torch.as_tensor(src["light_diffuse"]),
                        direction=torch.as_tensor(src["light_direction"]))
    static = f32(identity.static_offsets)
    dynamic = f32(true_dynamic_offsets(corpus, driver_clip_id, identity.identity_id)[ids])
    rendered, _ = world.render_head(identity, params, static, dynamic, camera, lighting, background)
    return DrivenClip(rendered, params, static, dynamic, camera, ids)


@dataclass
class ClipTargets:
    """What a fitter may see of a synthetic clip, and the truth to score it against."""

    landmarks: torch.Tensor       # (T, 68, 2) pixels (noisy when noise > 0)
    K: torch.Tensor               # (T, 3, 3)
    depth: torch.Tensor           # (T, H, W) exact camera depth of the true mesh
    normals: torch.Tensor         # (T, H, W, 3) exact camera-space normals
    true_vertices_cam: torch.Tensor   # (T, N_s, 3) true mesh in camera space
    true_dynamic: torch.Tensor    # (T, N_face, 3) true Δf, centred over the clip
    betas: np.ndarray
    expression: np.ndarray
    image_size: tuple[int, int]


def clip_targets(world: SyntheticWorld, corpus: str | os.PathLike, clip_id: str,
                 landmark_noise: float = 0.01, seed: int = 0) -> ClipTargets:
    """Exact depth/normal targets and truth for a corpus clip. The 2D landmarks are the
    projected true ones plus Gaussian noise of ``landmark_noise`` x the face width (the real
    detector on these renders deviates systematically from the synthetic landmark
    definitions, mostly on the jaw contour, so it is not used for scoring)."""
    from models.render.conditions import render_conditions
    clip = load_clip(corpus, clip_id)
    ident = load_identity(corpus, clip_id.split("_")[0])
    params, static, dynamic, _ = world.head_inputs(ident, ClipMotion.from_arrays(clip))
    cam = clip_camera(clip)
    K, size = cam.K, cam.image_size[0]
    with torch.no_grad():
        out = world.head(params, static, dynamic)
        maps = render_conditions(out.vertices, world.head.faces, cam)
        true_cam = cam.to_camera(out.vertices)
    lm = clip["landmarks_2d"]
    width = np.linalg.norm(lm[:, 16] - lm[:, 0], axis=-1).mean()
    rng = np.random.default_rng(seed)
    noisy = lm + rng.normal(0, landmark_noise * width, lm.shape).astype(np.float32)
    return ClipTargets(landmarks=torch.as_tensor(noisy), K=K, depth=maps.depth, normals=maps.normals,
                       true_vertices_cam=true_cam, true_dynamic=dynamic - dynamic.mean(0, keepdim=True),
                       betas=ident.betas, expression=clip["expression"], image_size=(size, size))
