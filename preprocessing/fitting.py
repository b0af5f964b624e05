"""Monocular fitting of the personalized head to a clip (or one image).

All frames are optimized jointly and vectorized (no per-frame Python loops in the hot path):

1. rigid: per-frame head rotation and translation from landmarks;
2. expression: β (one per identity), ψ, jaw, head pose, eyes per frame, with an explicit
   temporal smoothness term (stronger for landmark-only fits, which are noisier);
3. static offsets Δg (per identity): Laplacian and magnitude terms, heavier on the face so the
   face detail is left to Δf;
4. dynamic offsets Δf per frame (face region): zero-mean over the clip by construction,
   Laplacian, magnitude and temporal terms;
5. photometric (when the frames are given, no estimator needed): shape from shading with
   per-frame SH lighting and a per-identity albedo refines Δg and Δf as height fields along
   the normal (:mod:`preprocessing.photometric`), on top of any depth/normal targets.

Device: ``FitConfig.device`` ("auto": cuda when the process sees a GPU, e.g. a Ray worker that
reserved one, else cpu); the fit runs there and its result comes back on the CPU.

Data terms: 68 landmarks (robust, contour down-weighted; where the head's landmark embedding
puts them, and with its per-point weights when the detector was calibrated on this model, see
:mod:`preprocessing.landmark_calibration`) and, when target maps exist
(exact ones in the synthetic world; a pluggable estimator for real video), depth and normal
L1 terms between each visible model vertex and the target maps sampled where it projects
(the mesh-to-image direction: no rasterization inside the loop, so it is fast on CPU).

Geometry: the camera is at the origin in OpenCV orientation (R = diag(1, -1, -1), t = 0) with
per-frame intrinsics; the head moves (rotation about the head joint, translation). The body
below the neck stays still in the camera frame except for that translation.
"""
from __future__ import annotations

import dataclasses
import math
import time
import copy
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from models.head.head_model import HeadParams, PersonalizedHead
from models.render.camera import Camera
from models.render.conditions import vertex_normals

from .mesh_solvers import conjugate_gradients, lap_apply, sample_maps, sub_laplacian

# Landmark weights: the contour follows the silhouette and is least reliable.
LANDMARK_WEIGHTS = np.ones(68, np.float32)
LANDMARK_WEIGHTS[:17] = 0.3
RIGID_LANDMARKS = np.array([27, 28, 29, 30, 31, 33, 35, 36, 39, 42, 45, 48, 54])


@dataclass
class FitConfig:
    iters_rigid: int = 50
    iters_expression: int = 160
    offset_rounds: int = 2          # Gauss-Newton rounds for Δf
    static_rounds: int = 1          # of which the first ones also update Δg
    cg_iters: int = 25
    lr_rigid: float = 0.02
    lr_expression: float = 0.02
    w_landmarks: float = 1.0
    # With a dense embedding (all of the detector's points): the share of the landmark term in the
    # expression stages that goes to every point (the rest to the 68); rigid stage, init, QC: the 68
    dense_landmark_share: float = 1.0
    w_shape_prior: float = 2e-3
    # Landmark-only fits: 68 points pin β poorly, so a stronger prior; sweep: docs/experiments/2026-12-06-fitting.md
    w_shape_prior_landmarks_only: float = 0.05
    w_expression_prior: float = 5e-4
    # Landmark-only fits: a weak ψ prior lets the 100 coefficients follow the detector's noise;
    # sweep (other identities): docs/experiments/2026-12-06-fitting.md
    w_expression_prior_landmarks_only: float = 0.3
    w_jaw_prior: float = 1e-2
    w_temporal: float = 2.0         # 0 disables temporal smoothness (ablation)
    # Landmark-only fits (no dense targets) are noisier; sweep: docs/experiments/2026-12-06-fitting.md
    w_temporal_landmarks_only: float = 16.0
    w_depth: float = 40.0
    w_normal: float = 0.2
    # Offset solves (per visible vertex the depth term has weight 1; these are relative).
    w_static_magnitude: float = 0.05
    w_static_face: float = 0.5       # extra magnitude on the face: detail belongs to Δf
    w_static_laplacian: float = 2.0
    w_dynamic_magnitude: float = 0.1
    w_dynamic_laplacian: float = 2.0
    w_dynamic_temporal: float = 1.0  # the Δf solve's own (w_temporal = 0 turns it off too)
    # Δf from dense targets sees the depth residual's high-pass (0: off); sweep: docs/experiments/2026-12-06-fitting.md
    dynamic_highpass_iters: int = 5
    batch_frames: int = 5           # frames per stage-2 step of the dense terms
    dense_every: int = 6            # stage 2 adds the dense terms every n-th step (second half)
    visibility_tol: float = 0.012   # metres between a vertex and the target depth to count as seen
    fov_deg: float = 20.0           # when intrinsics are unknown
    diverged_pct: float = 8.0       # landmark error (% of face size) past which a frame diverged
    seed: int = 0
    # Shape from shading for Δg/Δf; off: it does not beat zero offsets (docs/experiments/2026-12-06-fitting.md)
    photometric: bool = False
    photo_rounds: int = 2
    photo_static: bool = True       # photometric Δg (when the identity's Δg is not given)
    photo_cg_iters: int = 20
    # Scales the photometric Δf priors (magnitude, Laplacian, time, ψ); sweep: docs/experiments/2026-12-06-fitting.md
    photo_regularization: float = 16.0
    # Photometric registration (stage 2b, docs/fitting.md); measured: docs/experiments/2026-12-06-fitting.md
    photo_registration: bool = True
    photo_registration_rounds: int = 2     # re-solves of visibility, normals, light and albedo
    photo_registration_iters: int = 30     # Adam steps per round
    w_photo_registration: float = 1.0
    photo_registration_sigma: float = 5.0  # robust scale of the RGB residual, % of full range
    photo_registration_blur: float = 1.5   # px, Gaussian pre-blur of the frames
    photo_registration_stride: int = 6     # every n-th face vertex carries the term
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass
class FitInputs:
    landmarks: Tensor                 # (T, 68, 2) pixels
    image_size: tuple[int, int]       # (H, W)
    landmark_weights: Tensor | None = None   # (T, 68); 0 where missing
    K: Tensor | None = None           # (T, 3, 3); default from fov_deg
    depth: Tensor | None = None       # (T, H, W) target camera depth, 0 where unknown
    normals: Tensor | None = None     # (T, H, W, 3) target camera-space normals (OpenCV)
    depth_is_metric: bool = True      # False: relative depth, scaled to the head after stage 1
    images: Tensor | None = None      # (T, H, W, 3) frames (uint8 or [0, 1]) for the photometric stage
    valid: Tensor | None = None       # (T, H, W) pixels inside the source frame (crops)
    dense_landmarks: Tensor | None = None          # (T, L, 2) all the detector's points (dense embedding)
    dense_landmark_weights: Tensor | None = None   # (T, L); 0 where missing

    @property
    def num_frames(self) -> int:
        return self.landmarks.shape[0]

    def unit_frames(self) -> tuple[Tensor, Tensor | None]:
        """What the photometric stages read: the frames as floats in [0, 1] and the validity
        mask as bools (None: every pixel is inside the source frame)."""
        images = self.images.float() / 255.0 if self.images.dtype == torch.uint8 else self.images.float()
        return images, None if self.valid is None else self.valid.bool()


@dataclass
class FitResult:
    params: HeadParams
    static_offsets: Tensor            # (N_s, 3)
    dynamic_offsets: Tensor           # (T, N_face, 3), zero-mean over frames
    camera: Camera
    qc: dict[str, np.ndarray]
    frame_status: list[str]
    stage_seconds: dict[str, float]
    loss_history: dict[str, list[float]] = field(default_factory=dict)

    def vertices(self, head: PersonalizedHead) -> Tensor:
        with torch.no_grad():
            return head(self.params, self.static_offsets, self.dynamic_offsets).vertices


def default_intrinsics(num_frames: int, image_size: tuple[int, int], fov_deg: float) -> Tensor:
    h, w = image_size
    f = 0.5 * h / math.tan(math.radians(fov_deg) / 2)
    k = torch.tensor([[f, 0, (w - 1) / 2], [0, f, (h - 1) / 2], [0, 0, 1.0]])
    return k.expand(num_frames, 3, 3).clone()


def fitting_camera(K: Tensor, image_size: tuple[int, int]) -> Camera:
    t = K.shape[0]
    rot = torch.diag(torch.tensor([1.0, -1.0, -1.0])).expand(t, 3, 3).clone()
    return Camera.from_matrices(K, rot, torch.zeros(t, 3), image_size)


def _gmof(x: Tensor, sigma: float) -> Tensor:
    """Geman-McClure robust penalty of residual norms."""
    x2 = x.square()
    return sigma ** 2 * x2 / (sigma ** 2 + x2)


def face_size(landmarks: Tensor) -> Tensor:
    """Per-frame face size in pixels: the side of the landmark bounding box's square root area."""
    lo, hi = landmarks.amin(1), landmarks.amax(1)
    return ((hi - lo).prod(-1)).sqrt().clamp(min=1.0)


@dataclass
class _FitState:
    """What the stages of one fit share; ``inputs`` and ``lmk_depth`` change once relative
    depth is scaled to the head (stage 2), ``params`` when they are detached."""

    inputs: FitInputs
    camera: Camera
    lmk: Tensor                      # (T, 68, 2) landmark targets (NaN -> 0)
    w_lmk: Tensor                    # (T, 68) their weights (0 where missing)
    size: Tensor                     # (T,) face size (pixels)
    lmk_depth: Tensor | None         # (T, 68) depth at the landmarks (metric targets only)
    params: HeadParams
    w_temporal: float
    w_shape_prior: float
    dense: bool                      # depth targets given
    w_expression_prior: float = 0.0
    points: Tensor | None = None     # (T, L, 2) every detected point (a dense embedding), NaN -> 0
    w_points: Tensor | None = None   # (T, L) their weights


class Fitter:
    def __init__(self, head: PersonalizedHead, config: FitConfig | None = None,
                 landmark_weights: np.ndarray | None = None,
                 dense_landmarks: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> None:
        """``landmark_weights`` (68,): the landmark term's per-point weights (default
        :data:`LANDMARK_WEIGHTS`; a calibrated embedding brings its own, see
        ``landmark_embedding.LandmarkEmbedding.weights``). ``dense_landmarks``: (faces (L,),
        bary (L, 3), weights (L,)) of every point of a dense embedding
        (``LandmarkEmbedding.dense_points``): the expression stages then fit all L points of
        ``FitInputs.dense_landmarks`` (``FitConfig.dense_landmark_share``)."""
        from .photometric import PhotometricConfig, PhotometricSolver
        self.config = config or FitConfig()
        self.landmark_weights = np.asarray(landmark_weights if landmark_weights is not None else LANDMARK_WEIGHTS,
                                           dtype=np.float32)
        if self.landmark_weights.shape != (68,):
            raise ValueError(f"landmark_weights must be (68,), got {self.landmark_weights.shape}")
        self.device = self.config.resolved_device()
        if self.device.type != "cpu":       # the caller's head stays where it is (it also renders)
            head = copy.deepcopy(head).to(self.device)
        self.head = head
        self.dense_weights = None
        with torch.device(self.device):
            self.lm_head = head.landmark_model()
            self.points_head = None
            if dense_landmarks is not None:
                faces, bary, weights = dense_landmarks
                self.points_head = head.surface_points_model(faces, bary)
                self.dense_weights = torch.as_tensor(np.asarray(weights, np.float32))
                if self.dense_weights.shape != (len(faces),):
                    raise ValueError(f"dense landmark weights must be ({len(faces)},), "
                                     f"got {tuple(self.dense_weights.shape)}")
            self.lap = head.laplacian()
            face = torch.zeros(head.num_vertices)
            face[head.face_vertex_ids] = 1.0
            self.face_weight = face
            # Faces around the face region: the normal terms need only these.
            self.normal_faces = head.faces[(face[head.faces] > 0).any(1)]
            c, k = self.config, self.config.photo_regularization
            base = PhotometricConfig()
            self._region_model = None                          # built on first use (stage 2b)
            self.photometric = PhotometricSolver(head, dataclasses.replace(
                base, rounds=c.photo_rounds, cg_iters=c.photo_cg_iters, dyn_magnitude=base.dyn_magnitude * k,
                dyn_laplacian=base.dyn_laplacian * k, dyn_temporal=base.dyn_temporal * k,
                dyn_expression=base.dyn_expression * k))

    def fit(self, inputs: FitInputs, betas: Tensor | None = None,
            static_offsets: Tensor | None = None, fit_offsets: bool = True) -> FitResult:
        """Fit a clip. ``betas``/``static_offsets`` from another clip of the same identity are
        kept fixed when given (the identity is shared). Runs on ``config.device`` with every
        frame batched; the result is on the CPU."""
        dev = self.device
        move = lambda x: (x.to(dev, torch.float32) if x.is_floating_point() else x.to(dev)) \
            if isinstance(x, Tensor) else x
        inputs = FitInputs(**{k: move(getattr(inputs, k)) for k in inputs.__dataclass_fields__})
        if dev.type == "cpu":              # no device mode on the CPU (it costs per op)
            return self._fit(inputs, move(betas), move(static_offsets), fit_offsets)
        with torch.device(dev):
            result = self._fit(inputs, move(betas), move(static_offsets), fit_offsets)
        cpu = lambda x: x.cpu()
        return dataclasses.replace(result, params=result.params.map(cpu), static_offsets=result.static_offsets.cpu(),
                                   dynamic_offsets=result.dynamic_offsets.cpu(), camera=result.camera.to("cpu"))

    # ------------------------------------------------------------------------------------------
    def _fit(self, inputs: FitInputs, betas: Tensor | None, static_offsets: Tensor | None,
             fit_offsets: bool) -> FitResult:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        st = self._fit_state(inputs, betas)
        timings, history = {}, {}
        t0 = time.perf_counter()
        history["rigid"] = self._fit_rigid(st)
        timings["rigid"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        opt = self._fit_expression(st, betas, history)
        timings["expression"] = time.perf_counter() - t0
        if cfg.photo_registration and st.inputs.images is not None:
            t0 = time.perf_counter()
            history["photo_registration"] = self._photometric_registration(
                st.params, st.camera, st.inputs, opt, lambda it: self._expression_loss(st, it, st.dense))
            timings["photo_registration"] = time.perf_counter() - t0
        static, dynamic, photo = self._fit_all_offsets(st, static_offsets, fit_offsets, timings, history)
        t0 = time.perf_counter()
        qc, status = self._quality(st.params, static, dynamic, st.camera, st.inputs, st.lmk, st.w_lmk, st.size)
        if photo is not None:
            qc["photometric_residual"] = photo.residual.cpu().numpy()
            qc["photometric_residual_no_dynamic"] = photo.residual_no_dynamic.cpu().numpy()
        timings["quality"] = time.perf_counter() - t0
        return FitResult(params=st.params, static_offsets=static.detach(), dynamic_offsets=dynamic.detach(),
                         camera=st.camera, qc=qc, frame_status=status, stage_seconds=timings,
                         loss_history=history)

    def _fit_state(self, inputs: FitInputs, betas: Tensor | None) -> "_FitState":
        """The camera, the landmark targets and weights, the face size per frame and the
        initial parameters of a fit."""
        cfg = self.config
        t = inputs.num_frames
        K = inputs.K if inputs.K is not None else default_intrinsics(t, inputs.image_size, cfg.fov_deg)
        camera = fitting_camera(K.float(), inputs.image_size)
        w_lmk = torch.as_tensor(self.landmark_weights)[None].expand(t, -1).clone()
        if inputs.landmark_weights is not None:
            w_lmk = w_lmk * inputs.landmark_weights
        w_lmk = w_lmk * torch.isfinite(inputs.landmarks).all(-1)
        lmk = torch.nan_to_num(inputs.landmarks.float())
        found = w_lmk.sum(1) > 0
        size = face_size(lmk)
        if found.any():
            size = torch.where(found, size, size[found].median())
        lmk_depth = self._landmark_depth(lmk, inputs) if inputs.depth_is_metric else None
        params = self._initial_params(lmk, w_lmk, camera, lmk_depth)
        if betas is not None:
            params.betas = betas.reshape(1, -1).clone()
        has_dense = inputs.depth is not None or inputs.normals is not None
        w_temporal = 0.0 if cfg.w_temporal == 0 else (
            cfg.w_temporal if has_dense else cfg.w_temporal_landmarks_only)
        w_shape_prior = cfg.w_shape_prior if has_dense else cfg.w_shape_prior_landmarks_only
        points = w_points = None
        if self.points_head is not None and inputs.dense_landmarks is not None and cfg.dense_landmark_share > 0:
            if inputs.dense_landmarks.shape[1] != len(self.dense_weights):
                raise ValueError(f"FitInputs.dense_landmarks has {inputs.dense_landmarks.shape[1]} points, the "
                                 f"fitter's dense embedding {len(self.dense_weights)}")
            w_points = self.dense_weights.to(inputs.dense_landmarks.device)[None].expand(t, -1).clone()
            if inputs.dense_landmark_weights is not None:
                w_points = w_points * inputs.dense_landmark_weights
            w_points = w_points * torch.isfinite(inputs.dense_landmarks).all(-1)
            points = torch.nan_to_num(inputs.dense_landmarks.float())
        return _FitState(inputs, camera, lmk, w_lmk, size, lmk_depth, params, w_temporal, w_shape_prior,
                         dense=inputs.depth is not None, points=points, w_points=w_points,
                         w_expression_prior=cfg.w_expression_prior if has_dense
                         else cfg.w_expression_prior_landmarks_only)

    @staticmethod
    def _points_loss(st: "_FitState", cam_pts: Tensor, target: Tensor, w: Tensor) -> Tensor:
        """Robust 2D error of camera-space points against pixel targets, in % of the face size."""
        r = (st.camera.project(cam_pts) - target) / st.size[:, None, None] * 100.0
        return (_gmof(r.norm(dim=-1), 10.0) * w).sum() / w.sum().clamp(min=1)

    def _landmark_loss(self, st: "_FitState", lm3d: Tensor, subset=None, w2d: float = 1.0) -> Tensor:
        """Robust 2D landmark error in % of the face size, times ``w2d`` (+ depth where metric
        targets exist)."""
        cam_pts, target, w = st.camera.to_camera(lm3d), st.lmk, st.w_lmk
        if subset is not None:
            cam_pts, target, w = cam_pts[:, subset], target[:, subset], w[:, subset]
        loss = w2d * self._points_loss(st, cam_pts, target, w) if w2d else cam_pts.new_zeros(())
        if st.lmk_depth is not None:                           # anchor depth where targets exist
            dz = st.lmk_depth if subset is None else st.lmk_depth[:, subset]
            wz = (dz > 0) * w
            wz[:, :17] = 0
            loss = loss + (_gmof((cam_pts[..., 2] - dz) * 100.0, 3.0) * wz).sum() / wz.sum().clamp(min=1)
        return loss

    @staticmethod
    def _temporal(st: "_FitState", x: Tensor, order: int = 1) -> Tensor:
        """Mean squared ``order``-th difference along time (0 when temporal smoothing is off)."""
        if x.shape[0] <= order or st.w_temporal == 0:
            return x.new_zeros(())
        d = x
        for _ in range(order):
            d = d[1:] - d[:-1]
        return d.square().sum(-1).mean()

    def _fit_rigid(self, st: "_FitState") -> list[float]:
        """Stage 1: rigid head pose and translation."""
        cfg, params, temporal = self.config, st.params, self._temporal
        opt = torch.optim.Adam([{"params": [params.head_pose], "lr": cfg.lr_rigid},
                                {"params": [params.transl], "lr": cfg.lr_rigid * 0.1}])
        return _adam(opt, cfg.iters_rigid, lambda it: self._landmark_loss(
            st, self.lm_head(params)[0], RIGID_LANDMARKS) + st.w_temporal * 10.0 * (
            temporal(st, params.head_pose, 2) + temporal(st, params.transl * 10, 2)))

    def _expression_loss(self, st: "_FitState", it: int, dense: bool) -> Tensor:
        cfg, params, temporal = self.config, st.params, self._temporal
        share = cfg.dense_landmark_share if st.points is not None else 0.0
        loss = 0.0
        if share < 1 or st.lmk_depth is not None:          # the 68's 2D share, or their depth anchor
            loss = cfg.w_landmarks * self._landmark_loss(st, self.lm_head(params)[0], w2d=1 - share)
        if share > 0:
            loss = loss + cfg.w_landmarks * share * self._points_loss(
                st, st.camera.to_camera(self.points_head(params)), st.points, st.w_points)
        loss = loss + st.w_shape_prior * params.betas.square().sum() \
            + st.w_expression_prior * params.expression.square().sum(-1).mean() \
            + cfg.w_jaw_prior * params.jaw_pose.square().sum(-1).mean() \
            + 1e-2 * (params.leye_pose.square().sum(-1).mean() + params.reye_pose.square().sum(-1).mean())
        loss = loss + st.w_temporal * (temporal(st, params.expression) * 0.5 + temporal(st, params.jaw_pose) * 20
                                       + temporal(st, params.head_pose, 2) * 10
                                       + temporal(st, params.transl * 10, 2) * 10)
        if dense and it % cfg.dense_every == 0:
            t = st.inputs.num_frames
            frames = self._frame_batch(t)
            verts = self.head(params.map(lambda x: x[frames] if x.shape[0] == t else x)).vertices
            loss = loss + self._dense_loss(verts, st.camera, st.inputs, frames)
        return loss

    def _fit_expression(self, st: "_FitState", betas: Tensor | None, history: dict) -> torch.optim.Adam:
        """Stage 2: shape, expression, jaw, pose, eyes (landmarks; depth/normals when given).
        The first half on landmarks alone; then relative depth can be scaled to the head, and
        the dense terms (when there are targets) join for the second half. Returns the optimizer."""
        cfg, params = self.config, st.params
        free = [params.expression, params.jaw_pose, params.head_pose, params.leye_pose,
                params.reye_pose] + ([params.betas] if betas is None else [])
        opt = torch.optim.Adam([{"params": free}, {"params": [params.transl], "lr": cfg.lr_expression * 0.1}],
                               lr=cfg.lr_expression)
        half = cfg.iters_expression // 2
        history["expression"] = _adam(opt, half, lambda it: self._expression_loss(st, it, False))
        if st.dense and not st.inputs.depth_is_metric:
            st.inputs = self._scale_relative_depth(st.inputs, params, st.camera, st.lmk, st.w_lmk)
            st.lmk_depth = self._landmark_depth(st.lmk, st.inputs)
        history["expression"] += _adam(opt, cfg.iters_expression - half,
                                       lambda it: self._expression_loss(st, half + it, st.dense))
        return opt

    def _fit_all_offsets(self, st: "_FitState", static_offsets: Tensor | None, fit_offsets: bool,
                         timings: dict, history: dict):
        """Stages 3-4: Δg and Δf from the dense targets (when given and ``fit_offsets``), then
        the photometric refinement (when images are given). Detaches the parameters. Returns
        (Δg, Δf, the photometric result or None)."""
        cfg, t = self.config, st.inputs.num_frames
        if fit_offsets and st.dense:
            static, dynamic, off_t, off_h = self.fit_offsets(st.params, st.camera, st.inputs, static_offsets)
            timings.update(off_t)
            history.update(off_h)
        else:
            static = static_offsets.clone() if static_offsets is not None else torch.zeros(self.head.num_vertices, 3)
            dynamic = torch.zeros(t, self.head.num_face_vertices, 3)
        st.params = st.params.map(lambda x: x.detach())
        photo = None
        if fit_offsets and cfg.photometric and st.inputs.images is not None:
            t0 = time.perf_counter()
            static, dynamic, photo = self.fit_photometric(st.params, st.camera, st.inputs, static, dynamic,
                                                          fit_static=static_offsets is None and cfg.photo_static)
            timings["photometric"] = time.perf_counter() - t0
        return static, dynamic, photo

    def _photometric_registration(self, params: HeadParams, camera: Camera, inputs: FitInputs,
                                  opt: torch.optim.Adam, other_loss) -> list[float]:
        """Stage 2b: each round renders the face vertices' colours (per-frame SH light and a
        per-vertex albedo solved in closed form by :class:`~preprocessing.photometric.PhotometricSolver`
        with visibility and normals of the current fit), then Adam moves the parameters so the
        frames sampled where those vertices project match it (robust RGB residual; gradients
        through the image), together with ``other_loss`` (landmarks, priors, time)."""
        from .photometric import blur, shade_vertices
        cfg, solver = self.config, self.photometric
        if self._region_model is None:                       # every n-th face vertex
            pick = torch.arange(0, self.head.num_face_vertices, cfg.photo_registration_stride)
            self._region_model = (self.head.vertex_subset_model(self.head.face_vertex_ids[pick]), pick)
        region, pick = self._region_model
        images, valid = inputs.unit_frames()
        images = blur(images, cfg.photo_registration_blur)
        history, albedo, light = [], None, None
        for _ in range(cfg.photo_registration_rounds):
            with torch.no_grad():
                verts = self.head(params).vertices
                colours, normals, w = solver.observe(verts, camera, images, solver._visibility(verts, camera, valid))
                albedo, light, _ = solver._light_albedo(colours, normals, w, albedo, light)
                rendered = shade_vertices(albedo, light, normals)[:, pick]
                w = w[:, pick]
                wsum = w.sum().clamp(min=1)

            def loss_fn(it):
                uv = camera.project(camera.to_camera(region(params)))
                # squared norm by hand: a norm over the sampler's strided output is 30x slower on CPU
                r2 = (sample_maps(images, uv) - rendered).square().sum(-1) * 1e4       # (% of range)²
                sig2 = cfg.photo_registration_sigma ** 2
                return other_loss(it) + cfg.w_photo_registration * (sig2 * r2 / (sig2 + r2) * w).sum() / wsum

            history += _adam(opt, cfg.photo_registration_iters, loss_fn)
        return history

    def fit_offsets(self, params: HeadParams, camera: Camera, inputs: FitInputs,
                    static_offsets: Tensor | None = None):
        """Stages 3 and 4 with shape, expression and pose fixed: Δg (unless given) and Δf.

        Offsets act linearly then (base + R @ Δ); after linearizing the data term per vertex
        each stage is regularized least squares, solved by Gauss-Newton rounds of conjugate
        gradients. Returns (Δg, Δf zero-mean, timings, residual history).
        """
        cfg = self.config
        t = inputs.num_frames
        timings, history = {}, {}
        t0 = time.perf_counter()
        base, rots = self.head.offset_map(params)
        face_ids = self.head.face_vertex_ids
        static = static_offsets.clone() if static_offsets is not None else torch.zeros(self.head.num_vertices, 3)
        dyn = torch.zeros(t, len(face_ids), 3)
        # Offsets move vertices by millimetres: visibility from the base mesh holds.
        with torch.no_grad():
            visible = torch.cat([
                _map_residuals(base[fr], camera.select(fr), inputs.depth[fr], None, self.normal_faces, face_ids,
                               cfg.visibility_tol, per_frame=True, return_visible=True)
                for fr in torch.arange(t).split(16)])
        timings["offset_map"] = time.perf_counter() - t0

        def posed(ids: Tensor | None = None) -> Tensor:
            off = static.expand(t, -1, -1).index_add(1, face_ids, dyn)
            if ids is None:
                return base + (rots * off[:, :, None, :]).sum(-1)
            return base[:, ids] + (rots[:, ids] * off[:, ids, None, :]).sum(-1)

        lap_face = sub_laplacian(self.lap, face_ids)
        rots_f, visible_f = rots[:, face_ids], visible[:, face_ids]
        hist_s, hist_d = [], []
        t_static = t_dynamic = 0.0
        for round_ in range(cfg.offset_rounds):
            t0 = time.perf_counter()
            if static_offsets is None and round_ < cfg.static_rounds:
                a, r, vis = self._depth_system(posed(), rots, camera, inputs, visible)
                static = static + _solve_static(a, r, vis, self.lap, cfg, self.face_weight)
                hist_s.append(float((r.abs() * vis).sum() / vis.sum().clamp(min=1)))
            t_static += time.perf_counter() - t0
            t0 = time.perf_counter()
            af, rf, vf = self._depth_system(posed(face_ids), rots_f, camera, inputs, visible_f)
            if cfg.dynamic_highpass_iters > 0:
                rf = rf - _smooth_on_mesh(rf, vf, lap_face, cfg.dynamic_highpass_iters)
            dyn = dyn + _solve_dynamic(af, rf, vf, lap_face, cfg)
            dyn = dyn - dyn.mean(0, keepdim=True)
            hist_d.append(float((rf.abs() * vf).sum() / vf.sum().clamp(min=1)))
            t_dynamic += time.perf_counter() - t0
        history["static"], history["dynamic"] = hist_s, hist_d
        timings["static"], timings["dynamic"] = t_static, t_dynamic
        return static, dyn, timings, history

    def fit_photometric(self, params: HeadParams, camera: Camera, inputs: FitInputs, static: Tensor,
                        dynamic: Tensor, fit_static: bool = True):
        """Stage 5: Δg and Δf refined by shape from shading (heights along the neutral normal)
        with shape, expression and pose fixed. Returns (Δg, Δf zero-mean, PhotometricResult)."""
        images, valid = inputs.unit_frames()
        base, rots = self.head.offset_map(params)
        # The Δf already found (depth targets) is part of the base the shading refines.
        base = base.clone()
        ids = self.head.face_vertex_ids
        base[:, ids] += (rots[:, ids] @ dynamic[..., None])[..., 0]
        solver = self.photometric
        res = solver.solve(base, rots, camera, images, valid, params.betas, static, fit_static=fit_static)
        _, n_can, _ = solver.neutral_frame(params.betas, static)
        d_static, d_dyn = solver.offsets(res, n_can, self.head.num_vertices)
        dyn = dynamic + d_dyn
        return static + d_static, dyn - dyn.mean(0, keepdim=True), res

    def _depth_system(self, verts: Tensor, rots: Tensor, camera: Camera, inputs: FitInputs,
                      visible: Tensor):
        """Linearized data term per vertex: d(residual)/d(offset) (T, N, 3), residual (T, N),
        weight (T, N). Point-to-plane against the target surface when target normals exist
        (offsets then move along the surface normal, not along the viewing ray); else the
        depth difference along the ray."""
        with torch.no_grad():
            vc = camera.to_camera(verts)
            uv = camera.project(vc)
            d_t = sample_maps(inputs.depth[..., None], uv)[..., 0]
            vis = (visible & (d_t > 0) & ((vc[..., 2] - d_t).abs() < self.config.visibility_tol)).float()
            # d(m . camera point)/d(offset) = (R_cam^T m)^T R_v, formed without tiny matmuls.
            along = lambda m: ((m @ camera.R)[..., :, None] * rots).sum(-2)
            if inputs.normals is None:
                return along(camera.R[:, None, 2, :].expand_as(vc)), vc[..., 2] - d_t, vis
            n_t = torch.nn.functional.normalize(sample_maps(inputs.normals, uv), dim=-1)
            ray = torch.cat([(uv - camera.principal[:, None]) / camera.focal[:, None],
                             torch.ones_like(uv[..., :1])], -1)
            target = ray * d_t[..., None]                        # the target surface point
            r = ((vc - target) * n_t).sum(-1)
            a = along(n_t)
        return a, r, vis

    def _scale_relative_depth(self, inputs: FitInputs, params: HeadParams, camera: Camera,
                              lmk: Tensor, w_lmk: Tensor) -> FitInputs:
        """Scale relative target depth to the rigidly fitted head: one factor per clip, the
        median ratio of model to target depth under the inner-face landmarks."""
        import dataclasses
        with torch.no_grad():
            model_z = camera.to_camera(self.lm_head(params)[0])[..., 2]
            target_z = self._landmark_depth(lmk, inputs)
            ok = (target_z > 0) & (w_lmk > 0)
            ok[:, :17] = False
            scale = (model_z[ok] / target_z[ok]).median() if ok.any() else torch.tensor(1.0)
        return dataclasses.replace(inputs, depth=inputs.depth * scale, depth_is_metric=True)

    def _landmark_depth(self, lmk: Tensor, inputs: FitInputs) -> Tensor | None:
        """Target depth under each detected landmark (0 where unknown), or None."""
        if inputs.depth is None:
            return None
        return sample_maps(inputs.depth[..., None], lmk, mode="nearest")[..., 0]

    def _frame_batch(self, t: int) -> Tensor:
        b = min(self.config.batch_frames, t)
        return torch.randperm(t)[:b].sort().values

    def _initial_params(self, lmk: Tensor, w: Tensor, camera: Camera,
                        lmk_depth: Tensor | None) -> HeadParams:
        """Translation from the landmarks' size and centre (or the target depth under them);
        identity rotation."""
        t = lmk.shape[0]
        params = HeadParams.zeros(t)
        with torch.no_grad():
            lm3d, _ = self.lm_head(params)              # rest landmarks, model units
        rest_width = float((lm3d[0, 16] - lm3d[0, 0]).norm())
        rest_centre = lm3d[0, 27:48].mean(0)
        valid = w.sum(1) > 0
        px_width = (lmk[:, 16] - lmk[:, 0]).norm(dim=-1)
        px_width = torch.where(valid, px_width, px_width[valid].median() if valid.any() else px_width)
        centre = lmk[:, 27:48].mean(1)
        if valid.any():
            centre = torch.where(valid[:, None], centre, centre[valid].mean(0))
        f = camera.focal[:, 0]
        depth = f * rest_width / px_width.clamp(min=1.0)
        if lmk_depth is not None:
            inner = lmk_depth[:, 27:48]
            known = (inner > 0).sum(1) > 3
            med = torch.where(inner > 0, inner, torch.nan).nanmedian(1).values
            depth = torch.where(known, med + 0.01, depth)     # landmarks sit ~1 cm before the centre
        x = (centre[:, 0] - camera.principal[:, 0]) / f * depth
        y = (centre[:, 1] - camera.principal[:, 1]) / f * depth
        # Camera space (x right, y down, z forward) = world (x, -y, -z).
        target = torch.stack([x, -y, -depth], 1)
        params.transl = target - rest_centre
        return params

    def _dense_loss(self, verts: Tensor, camera: Camera, inputs: FitInputs,
                    frames: Tensor, visible: Tensor | None = None) -> Tensor:
        cfg = self.config
        residual = self._residuals(verts, camera, inputs, frames, visible)
        loss = cfg.w_depth * residual["depth"]
        if "normal" in residual:
            loss = loss + cfg.w_normal * residual["normal"]
        return loss

    def _residuals(self, verts, camera, inputs, frames, visible=None, per_frame=False):
        return _map_residuals(verts, camera.select(frames), inputs.depth[frames],
                              None if inputs.normals is None else inputs.normals[frames],
                              self.normal_faces, self.head.face_vertex_ids,
                              self.config.visibility_tol, visible, per_frame)

    def _quality(self, params, static, dynamic, camera, inputs, lmk, w_lmk, size):
        cfg = self.config
        with torch.no_grad():
            out = self.head(params, static, dynamic)
            uv = camera.project(camera.to_camera(out.landmarks))
            err = (uv - lmk).norm(dim=-1)
            valid = w_lmk > 0
            err_px = torch.where(valid, err, torch.nan).nanmean(1)
            err_pct = err_px / size * 100.0
            face = out.vertices[:, self.head.face_vertex_ids]
            jitter = torch.zeros(inputs.num_frames)
            if inputs.num_frames > 2:
                acc = (face[2:] - 2 * face[1:-1] + face[:-2]).norm(dim=-1).mean(-1)
                jitter[1:-1] = acc
            qc = {"landmark_error_px": err_px.cpu().numpy(), "landmark_error_pct": err_pct.cpu().numpy(),
                  "jitter_mm": (jitter * 1000).cpu().numpy(),
                  "landmarks_found": (w_lmk.sum(1) > 0).cpu().numpy()}
            if inputs.depth is not None:
                d, nr = [], []
                for s in range(0, inputs.num_frames, 16):
                    fr = torch.arange(s, min(s + 16, inputs.num_frames))
                    r = self._residuals(out.vertices[fr].contiguous(), camera, inputs, fr,
                                        per_frame=True)
                    d.append(r["depth"])
                    if "normal" in r:
                        nr.append(r["normal"])
                qc["depth_residual_mm"] = (torch.cat(d) * 1000).cpu().numpy()
                if nr:
                    qc["normal_residual"] = torch.cat(nr).cpu().numpy()
        status = []
        for i in range(inputs.num_frames):
            e = qc["landmark_error_pct"][i]
            if not np.isfinite(e):
                status.append("no_landmarks" if not qc["landmarks_found"][i] else "fit_diverged")
            elif e > cfg.diverged_pct:
                status.append("fit_diverged")
            else:
                status.append("ok")
        return qc, status


def _adam(opt: torch.optim.Adam, iters: int, loss_fn) -> list[float]:
    """Run ``iters`` Adam steps on ``loss_fn(step)``; the optimizer's tensors need gradients
    only while it runs. Returns the loss history."""
    params = [p for g in opt.param_groups for p in g["params"]]
    for p in params:
        p.requires_grad_(True)
    history = []
    for it in range(iters):
        opt.zero_grad()
        loss = loss_fn(it)
        loss.backward()
        opt.step()
        history.append(loss.item())
    for p in params:
        p.requires_grad_(False)
    return history


def _solve_static(a: Tensor, r: Tensor, vis: Tensor, lap: Tensor, cfg: FitConfig,
                  face_weight: Tensor) -> Tensor:
    """One Gauss-Newton step for Δg (N, 3) shared by all frames: minimise
    Σ_t vis (a·Δ + r)² / T + μ_v |Δ|² + λ |LΔ|²."""
    t = a.shape[0]
    mu = (cfg.w_static_magnitude + cfg.w_static_face * face_weight)[:, None]       # (N, 1)
    lam = cfg.w_static_laplacian
    wa = vis[..., None] * a / t                                                     # (T, N, 3)
    # The data term is block diagonal: one 3x3 normal matrix per vertex, summed over frames.
    blocks = torch.einsum("tni,tnj->nij", wa, a)

    def matvec(x):
        return (blocks @ x[..., None])[..., 0] + mu * x + lam * lap_apply(lap, lap_apply(lap, x))

    b = -(wa * r[..., None]).sum(0)
    diag = blocks.diagonal(dim1=-2, dim2=-1) + mu + lam * 4.0
    return conjugate_gradients(matvec, b, cfg.cg_iters, diag)


def _solve_dynamic(a: Tensor, r: Tensor, vis: Tensor, lap: Tensor, cfg: FitConfig) -> Tensor:
    """One Gauss-Newton step for Δf (T, N_face, 3): per-frame depth terms, magnitude and
    Laplacian per frame, and temporal smoothness coupling consecutive frames."""
    mu, lam, gam = cfg.w_dynamic_magnitude, cfg.w_dynamic_laplacian, cfg.w_dynamic_temporal * (cfg.w_temporal > 0)
    wa = vis[..., None] * a

    def lap_frames(x):                      # (T, N, 3): Laplacian per frame
        return lap_apply(lap, x.permute(1, 0, 2)).permute(1, 0, 2)

    def temporal(x):                        # D^T D along time
        if x.shape[0] < 2:
            return torch.zeros_like(x)
        d = x[1:] - x[:-1]
        out = torch.zeros_like(x)
        out[1:] += d
        out[:-1] -= d
        return out

    def matvec(x):
        return wa * (a * x).sum(-1, keepdim=True) + mu * x + lam * lap_frames(lap_frames(x)) + gam * temporal(x)

    b = -wa * r[..., None]
    diag = wa * a + mu + lam * 4.0 + 2 * gam
    return conjugate_gradients(matvec, b, cfg.cg_iters, diag)


def _smooth_on_mesh(x: Tensor, weight: Tensor, lap: Tensor, iters: int) -> Tensor:
    """Weighted smoothing of per-vertex values (T, N) by ``iters`` explicit diffusion steps
    with the row-normalized Laplacian ``lap`` (N, N): where ``weight`` is 0 the values do not
    count."""
    t = x.shape[0]
    both = torch.cat([x * weight, weight]).T.contiguous()        # (N, 2T): values, weights
    for _ in range(iters):
        both = both + 0.5 * lap_apply(lap, both)
    return (both[:, :t] / both[:, t:].clamp(min=1e-6)).T


def _map_residuals(verts: Tensor, camera: Camera, depth: Tensor, normals: Tensor | None,
                   normal_faces: Tensor, normal_ids: Tensor, tol: float,
                   visible: Tensor | None = None, per_frame: bool = False,
                   return_visible: bool = False):
    """L1 residuals of visible vertices against target maps sampled where they project.

    Depth: every vertex within ``tol`` of the target depth inside the target silhouette.
    Normals: the vertices ``normal_ids`` (the face region), whose normals come from
    ``normal_faces`` only (the faces around them: a third of the mesh, so it is cheap), and
    which must also face the camera. ``visible`` (B, N) replaces the depth-tolerance test.
    """
    h, w = camera.image_size
    vc = camera.to_camera(verts)
    uv = camera.project(vc)
    d_t = sample_maps(depth[..., None], uv)[..., 0]                           # (B, N)
    if visible is None:
        inside = (uv[..., 0] >= 0) & (uv[..., 0] <= w - 1) & (uv[..., 1] >= 0) & (uv[..., 1] <= h - 1)
        visible = (inside & (d_t > 0) & ((vc[..., 2] - d_t).abs() < tol)).detach()
    if return_visible:
        return visible
    wsum = visible.sum(1).clamp(min=1) if per_frame else visible.sum().clamp(min=1)
    dres = (vc[..., 2] - d_t).abs() * visible
    out = {"depth": dres.sum(1) / wsum if per_frame else dres.sum() / wsum}
    if normals is not None:
        n_v = vertex_normals(vc, normal_faces)[:, normal_ids]
        n_t = sample_maps(normals, uv[:, normal_ids])
        facing = (n_v * torch.nn.functional.normalize(vc[:, normal_ids], dim=-1)).sum(-1) < -0.1
        vis = visible[:, normal_ids] & facing.detach()
        nsum = vis.sum(1).clamp(min=1) if per_frame else vis.sum().clamp(min=1)
        nres = (n_v - n_t).abs().sum(-1) * vis
        out["normal"] = nres.sum(1) / nsum if per_frame else nres.sum() / nsum
    return out
