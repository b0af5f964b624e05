"""The personalized head representation: Ṽ(i) = B(V(β, ψ_i, θ_i)) + Δg + Δf(i), skinned.

- ``V``: SMPL-X blend shapes (300 shape, 100 expression) and pose correctives on the
  head-and-torso sub-mesh of an SMPL-X-format model.
- ``B``: barycentric upsampling (midpoint subdivision); each fine vertex is a point of a
  coarse triangle, so its skinning weights and correctives are the interpolated ones.
- ``Δg`` (per identity) and ``Δf(i)`` (per frame, face region only) are free per-vertex
  offsets on the fine mesh.

Design choice (the paper does not say): offsets are added in canonical space, after the blend
shapes and pose correctives and before skinning, as in the authors' earlier code for canonical
offsets. Offsets therefore rotate with the head and a zero-pose frame shows them unchanged.
``Δf`` is meant to be zero-mean over a clip (:func:`center_dynamic_offsets`); forward does not
impose it because it may see a single frame.

All joints except the global orientation, neck, head, jaw and eyes stay at rest: the body
below the bust is not modelled.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from smplx.lbs import batch_rodrigues, find_dynamic_lmk_idx_and_bcoords
from torch import Tensor, nn

from .regions import HEAD_TORSO_JOINTS, face_region, select_submesh
from .smplx_file import (JOINT, NUM_EXPRESSION_COEFFS, NUM_JOINTS, NUM_SHAPE_COEFFS,
                         SMPLXModelData, load_smplx_model)
from .topology import uniform_laplacian, upsample

POSED_JOINTS = ("neck", "head", "jaw", "left_eye", "right_eye")
NECK_KIN_CHAIN = (15, 12, 9, 6, 3, 0)     # as smplx: head up to the pelvis


class Kinematics:
    """Forward kinematics over the joints that matter: those that skin vertices or carry a
    pose, and their ancestors (about 11 of SMPL-X's 55). Every other joint has an identity
    local rotation, so its posed position follows from its nearest computed ancestor exactly.
    Same results as ``smplx.lbs.batch_rigid_transform`` with a fifth of the small matmuls."""

    def __init__(self, parents: np.ndarray, needed: list[int]) -> None:
        keep = set()
        for j in needed:
            while j >= 0 and j not in keep:
                keep.add(j)
                j = int(parents[j])
        self.ids = sorted(keep)                                  # parents precede children
        pos = {j: k for k, j in enumerate(self.ids)}
        self.local_parent = [pos[int(parents[j])] if parents[j] >= 0 else -1 for j in self.ids]
        anc = []
        for j in range(len(parents)):
            a = j
            while a not in pos:
                a = int(parents[a])
            anc.append(pos[a])
        self.ancestor = torch.as_tensor(anc)                    # (55,) index into ids
        self.ancestor_joint = torch.as_tensor([self.ids[a] for a in anc])
        self.ids_t = torch.as_tensor(self.ids)

    def __call__(self, rot: Tensor, joints_rest: Tensor) -> tuple[Tensor, Tensor]:
        """rot (T, 55, 3, 3) local rotations, joints_rest (T, 55, 3) ->
        posed joints (T, 55, 3) and relative transforms (T, K, 3, 4) of ``ids``."""
        r = rot[:, self.ids_t]
        j = joints_rest[:, self.ids_t]
        rs, ts = [], []
        for k, par in enumerate(self.local_parent):
            if par < 0:
                rs.append(r[:, k])
                ts.append(j[:, k])
            else:
                rs.append(rs[par] @ r[:, k])
                ts.append(ts[par] + (rs[par] @ (j[:, k] - j[:, par]).unsqueeze(-1)).squeeze(-1))
        g_r, g_t = torch.stack(rs, 1), torch.stack(ts, 1)               # global R, posed joints
        rel_t = g_t - (g_r @ j.unsqueeze(-1)).squeeze(-1)
        rel = torch.cat([g_r, rel_t.unsqueeze(-1)], -1)                 # (T, K, 3, 4)
        a_r, a_t = g_r[:, self.ancestor], g_t[:, self.ancestor]
        offset = joints_rest - joints_rest[:, self.ancestor_joint]
        posed = a_t + (a_r @ offset.unsqueeze(-1)).squeeze(-1)
        return posed, rel


@dataclass
class HeadParams:
    """Per-frame SMPL-X parameters of the head (T frames; ``betas`` is (1 or T, 300))."""

    betas: Tensor
    expression: Tensor
    global_orient: Tensor
    neck_pose: Tensor
    head_pose: Tensor
    jaw_pose: Tensor
    leye_pose: Tensor
    reye_pose: Tensor
    transl: Tensor

    @classmethod
    def zeros(cls, num_frames: int, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> "HeadParams":
        z = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)
        return cls(betas=z(1, NUM_SHAPE_COEFFS), expression=z(num_frames, NUM_EXPRESSION_COEFFS),
                   **{f.name: z(num_frames, 3) for f in fields(cls)
                      if f.name not in ("betas", "expression")})

    @property
    def num_frames(self) -> int:
        return self.expression.shape[0]

    def to_dict(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def map(self, fn) -> "HeadParams":
        return HeadParams(**{k: fn(v) for k, v in self.to_dict().items()})


@dataclass
class HeadOutput:
    vertices: Tensor     # (T, N_s, 3) posed, world units (metres)
    joints: Tensor       # (T, 55, 3) posed joints
    landmarks: Tensor    # (T, 68, 3) iBUG-68 landmarks on the personalized surface


def center_dynamic_offsets(dynamic_offsets: Tensor) -> Tensor:
    """Remove the temporal mean of Δf (T, N_face, 3): the static field owns the mean."""
    return dynamic_offsets - dynamic_offsets.mean(0, keepdim=True)


def _pose_chain(params: HeadParams, posed_joints: list[int], kinematics: "Kinematics",
                joint_template: Tensor, joint_dirs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """What every forward shares: local rotations of the posed joints (T, 5, 3, 3), all local
    rotations (T, 55, 3, 3), posed joints without the translation (T, 55, 3) and the
    kinematics' relative transforms (T, K, 3, 4); joints are linear in (β, ψ)."""
    t = params.num_frames
    dtype, device = params.expression.dtype, params.expression.device
    posed = torch.stack([params.neck_pose, params.head_pose, params.jaw_pose,
                         params.leye_pose, params.reye_pose], 1)                # (T, 5, 3)
    local_rots = batch_rodrigues(posed.reshape(-1, 3)).view(t, len(posed_joints), 3, 3)
    rot = torch.eye(3, dtype=dtype, device=device).repeat(t, NUM_JOINTS, 1, 1)
    rot[:, 0] = batch_rodrigues(params.global_orient)
    rot[:, posed_joints] = local_rots
    shape_expr = torch.cat([params.betas.expand(t, -1), params.expression], 1)
    joints_rest = joint_template + (shape_expr @ joint_dirs.T).view(t, NUM_JOINTS, 3)
    joints, rel = kinematics(rot, joints_rest)
    return local_rots, rot, joints, rel


def _f32(a) -> Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float32))


class PersonalizedHead(nn.Module):
    """Batched forward of the personalized head on the upsampled head-and-torso mesh.

    Fine vertices are numbered so that those skinned rigidly to one joint (weight 1) form
    contiguous ranges: their skinning is a single rigid transform, the rest blend. Internally
    vertices are rows (T, 3, N) with the vertex index innermost: upsampling is one
    dense-by-sparse product and skinning a batched 3x3 product, both vectorize well on CPU.
    ``HeadOutput.vertices`` is a (T, N, 3) view of that storage (not contiguous).
    """

    def __init__(self, model: SMPLXModelData, subdivision_levels: int = 1,
                 region_joints: tuple[int, ...] = HEAD_TORSO_JOINTS,
                 region_threshold: float = 0.5,
                 landmark_embedding: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """``landmark_embedding``: (faces (68,) of the full model, barycentric coordinates
        (68, 3)) replacing the model's iBUG-68 definitions as fixed surface points, contour
        included (e.g. where a detector such as MediaPipe puts its points on this model,
        ``preprocessing.landmark_calibration``); the face region stays the model's."""
        super().__init__()
        sub = select_submesh(model.weights, model.f, region_joints, region_threshold)
        ids = sub.vertex_ids
        up, active, fine_w = self._init_fine_mesh(model, ids, sub.faces, subdivision_levels)
        feat_cols = self._init_blend_shapes(model, ids)
        self._init_skinning(model, active, fine_w)
        self._init_upsampling(model, ids, up)
        static_faces, contour_faces = self._init_landmarks(model, sub, up, landmark_embedding)
        self._laplacian: Tensor | None = None
        # What LandmarkHead needs: the coarse vertices of landmark triangles only.
        used_faces = np.unique(np.concatenate([static_faces, contour_faces.ravel()]))
        lmk_verts = np.unique(sub.faces[used_faces])
        local = np.full(len(ids), -1, dtype=np.int64)
        local[lmk_verts] = np.arange(len(lmk_verts))
        self._landmark_data = dict(
            v_template=model.v_template[ids[lmk_verts]], weights=model.weights[ids][lmk_verts][:, active],
            shapedirs=model.shapedirs[ids[lmk_verts]][:, :, :NUM_SHAPE_COEFFS + NUM_EXPRESSION_COEFFS],
            posedirs=model.posedirs[ids[lmk_verts]][:, :, feat_cols], faces=local[sub.faces])

    def _buf(self, name: str, value: Tensor) -> None:
        self.register_buffer(name, value, persistent=False)

    def _init_fine_mesh(self, model: SMPLXModelData, ids: np.ndarray, faces: np.ndarray, subdivision_levels: int):
        """The upsampled mesh, its vertices numbered so that those skinned rigidly to one joint
        form contiguous ranges (:attr:`skin_ranges`). Returns (upsampling, the joints that skin
        the region, the fine vertices' weights over them)."""
        up = upsample(faces, len(ids), subdivision_levels)
        weights = model.weights[ids]
        active = np.nonzero(np.abs(weights).max(0) > 0)[0]
        fine_w = up.interpolate(weights[:, active])
        rigid = fine_w.max(1) >= 1.0 - 1e-6
        group = np.where(rigid, fine_w.argmax(1), len(active))     # len(active): blended
        up = up.reordered(np.argsort(group, kind="stable"))
        fine_w, group = up.interpolate(weights[:, active]), np.sort(group, kind="stable")
        bounds = np.searchsorted(group, np.arange(len(active) + 2))
        # (start, end, local joint or -1 for blended) ranges of the fine vertices.
        self.skin_ranges = [(int(bounds[g]), int(bounds[g + 1]), g if g < len(active) else -1)
                            for g in range(len(active) + 1) if bounds[g + 1] > bounds[g]]
        self.subdivision_levels = subdivision_levels
        self.num_coarse = len(ids)
        self.num_vertices = up.num_vertices
        return up, active, fine_w

    def _init_blend_shapes(self, model: SMPLXModelData, ids: np.ndarray) -> np.ndarray:
        """Blend shapes as rows over (coordinate, vertex): the forward works on (T, 3, V).
        Returns the pose-feature columns of the posed joints."""
        buf = self._buf
        rows = lambda d: _f32(np.ascontiguousarray(d.transpose(2, 1, 0)).reshape(d.shape[2], -1))
        buf("v_template", _f32(model.v_template[ids].T))                      # (3, V_sub)
        dirs = model.shapedirs[ids]
        buf("shapedirs", rows(dirs[:, :, :NUM_SHAPE_COEFFS]))                  # (300, 3 V_sub)
        # Expression and pose correctives only on the vertices they move (exact, saves time).
        expr = dirs[:, :, NUM_SHAPE_COEFFS:NUM_SHAPE_COEFFS + NUM_EXPRESSION_COEFFS]
        expr_rows = np.nonzero(np.abs(expr).max(axis=(1, 2)) > 0)[0]
        buf("expr_vertex_ids", torch.as_tensor(expr_rows))
        buf("exprdirs", rows(expr[expr_rows]))                                 # (100, 3 V_e)
        self.posed_joints = [JOINT[n] for n in POSED_JOINTS]
        feat_cols = np.concatenate([np.arange((j - 1) * 9, j * 9) for j in self.posed_joints])
        pdirs = model.posedirs[ids][:, :, feat_cols]
        pose_rows = np.nonzero(np.abs(pdirs).max(axis=(1, 2)) > 0)[0]
        buf("pose_vertex_ids", torch.as_tensor(pose_rows))
        buf("posedirs", rows(pdirs[pose_rows]))                                # (45, 3 V_p)
        # Joints are linear in (betas, expression): regress once, not per vertex.
        j_reg = model.J_regressor
        buf("joint_template", _f32(j_reg @ model.v_template))
        full_dirs = model.shapedirs[:, :, :NUM_SHAPE_COEFFS + NUM_EXPRESSION_COEFFS]
        buf("joint_dirs", _f32((j_reg @ full_dirs.reshape(j_reg.shape[1], -1)).reshape(-1, full_dirs.shape[-1])))
        return feat_cols

    def _init_skinning(self, model: SMPLXModelData, active: np.ndarray, fine_w: np.ndarray) -> None:
        """The kinematic chain of the joints used and the blended vertices' weights."""
        parents = model.parents.copy()
        parents[0] = -1                      # real files store the root as uint32 -1
        self.kinematics = Kinematics(parents, sorted(set(active.tolist()) | set(self.posed_joints)))
        kin_pos = {j: k for k, j in enumerate(self.kinematics.ids)}
        self._buf("skin_joints", torch.as_tensor(active))
        self._buf("skin_kin", torch.as_tensor([kin_pos[j] for j in active.tolist()]))
        blend_start = self.skin_ranges[-1][0] if self.skin_ranges[-1][2] < 0 else self.num_vertices
        self._buf("blend_weights", _f32(fine_w[blend_start:].T))             # (J, N_blend)

    def _init_upsampling(self, model: SMPLXModelData, ids: np.ndarray, up) -> None:
        """Upsampling as a sparse (V_sub, N_s) matrix (applied from the right to (T*3, V_sub)),
        the fine faces, the id maps and the face region on the fine mesh."""
        buf = self._buf
        cols = np.repeat(np.arange(up.num_vertices), 3)
        up_coo = torch.sparse_coo_tensor(
            torch.as_tensor(np.stack([up.vertex_ids.ravel(), cols])), _f32(up.bary.ravel()),
            (len(ids), up.num_vertices)).coalesce()
        buf("up_matrix_t", up_coo.to_sparse_csr())
        buf("faces", torch.as_tensor(up.faces))
        buf("submesh_vertex_ids", torch.as_tensor(ids))        # coarse sub-mesh -> model ids
        buf("coarse_to_fine", torch.as_tensor(up.coarse_to_fine))
        # Regions on the fine mesh.
        face_mask, _ = face_region(model.v_template, _rest_landmarks(model), model.weights)
        fine_face = up.interpolate(face_mask[ids].astype(np.float64)) > 0.5
        buf("face_mask", torch.as_tensor(fine_face))
        buf("face_vertex_ids", torch.as_tensor(np.nonzero(fine_face)[0]))

    def _init_landmarks(self, model: SMPLXModelData, sub, up,
                        landmark_embedding: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
        """Landmarks: coarse faces of the full model -> sub-mesh faces -> fine vertex ids.
        Returns the sub-mesh faces of the static (51,) and contour (bins, 17) landmarks."""
        face_remap = np.full(len(model.f), -1, dtype=np.int64)
        face_remap[sub.face_ids] = np.arange(len(sub.face_ids))
        static_faces, static_bary = face_remap[model.lmk_faces_idx], model.lmk_bary_coords
        contour_faces, contour_bary = face_remap[model.dynamic_lmk_faces_idx], model.dynamic_lmk_bary_coords
        if landmark_embedding is not None:            # fixed surface points: every yaw bin the same
            emb_faces, emb_bary = (np.asarray(a) for a in landmark_embedding)
            if emb_faces.shape != (68,) or emb_bary.shape != (68, 3):
                raise ValueError(f"a landmark embedding is 68 faces and (68, 3) barycentric coordinates, "
                                 f"got {emb_faces.shape} and {emb_bary.shape}")
            if emb_faces.min() < 0 or emb_faces.max() >= len(model.f):
                raise ValueError("landmark embedding faces are not faces of this model")
            bins = model.dynamic_lmk_faces_idx.shape[0]
            contour_faces = np.tile(face_remap[emb_faces[:17]], (bins, 1))
            contour_bary = np.tile(emb_bary[None, :17], (bins, 1, 1))
            static_faces, static_bary = face_remap[emb_faces[17:]], emb_bary[17:]
        if (static_faces < 0).any() or (contour_faces < 0).any():
            raise ValueError("landmark faces fall outside the head-and-torso region")
        buf = self._buf
        buf("lmk_face_vertices", torch.as_tensor(up.coarse_to_fine[sub.faces]))
        buf("static_lmk_faces", torch.as_tensor(static_faces))
        buf("static_lmk_bary", _f32(static_bary))
        buf("contour_lmk_faces", torch.as_tensor(np.ascontiguousarray(contour_faces)))
        buf("contour_lmk_bary", _f32(contour_bary))
        buf("submesh_face_ids", torch.as_tensor(sub.face_ids))            # sub-mesh face -> model face
        buf("neck_kin_chain", torch.as_tensor(NECK_KIN_CHAIN))
        return static_faces, contour_faces

    # ----------------------------------------------------------------------------------------
    def landmark_model(self) -> "LandmarkHead":
        """A small module giving the same landmarks as :meth:`forward` without offsets,
        computed on the few coarse vertices that landmark triangles use (for fast fitting)."""
        return LandmarkHead(self)

    def _pose_chain(self, params: HeadParams):
        return _pose_chain(params, self.posed_joints, self.kinematics, self.joint_template, self.joint_dirs)

    def surface_points_model(self, faces: np.ndarray, bary: np.ndarray) -> "SurfacePointsHead":
        """A module giving points at fixed barycentric coordinates ``bary`` (L, 3) on ``faces``
        (L,) of the full model, posed without offsets, as :meth:`landmarks` places embedded
        landmarks (e.g. all 478 points of a detector's calibrated embedding)."""
        return SurfacePointsHead(self, faces, bary)

    def vertex_subset_model(self, vertex_ids: Tensor) -> "VertexSubsetHead":
        """A module giving :meth:`forward`'s vertices (no offsets) for ``vertex_ids`` only,
        with the blend shapes upsampled onto them once: differentiable per-iteration fitting
        terms on a region without posing the whole mesh."""
        return VertexSubsetHead(self, vertex_ids)

    @classmethod
    def from_file(cls, path: str | Path, **kwargs) -> "PersonalizedHead":
        return cls(load_smplx_model(path), **kwargs)

    @property
    def num_face_vertices(self) -> int:
        return int(self.face_vertex_ids.numel())

    def laplacian(self) -> Tensor:
        """Uniform Laplacian of the fine mesh (sparse, built on first use)."""
        if self._laplacian is None or self._laplacian.device != self.faces.device:
            self._laplacian = uniform_laplacian(self.faces.cpu().numpy(), self.num_vertices).to(self.faces.device)
        return self._laplacian

    def upsample(self, coarse: Tensor) -> Tensor:
        """Barycentric upsampling B of per-coarse-vertex values (B, V_sub, C) -> (B, N_s, C)."""
        b, v, c = coarse.shape
        rows = coarse.transpose(1, 2).reshape(b * c, v)
        return self._upsample_rows(rows).view(b, c, -1).transpose(1, 2)

    def expression_directions(self, vertex_ids: Tensor) -> Tensor:
        """The expression blend shapes on the fine vertices ``vertex_ids``: (K, M, 3), canonical
        frame, metres per unit of ψ."""
        k = self.exprdirs.shape[0]
        coarse = self.exprdirs.new_zeros(k, 3, self.num_coarse)
        coarse[:, :, self.expr_vertex_ids] = self.exprdirs.view(k, 3, -1)
        return self._upsample_rows(coarse.reshape(k * 3, -1)).view(k, 3, -1)[:, :, vertex_ids].transpose(1, 2)

    def _upsample_rows(self, rows: Tensor) -> Tensor:
        up = self.up_matrix_t if self.up_matrix_t.dtype == rows.dtype else self.up_matrix_t.to(rows.dtype)
        return rows @ up

    # ----------------------------------------------------------------------------------------
    def _canonical_rows(self, params: HeadParams, static_offsets: Tensor | None,
                        dynamic_offsets: Tensor | None, rot_mats: Tensor | None) -> Tensor:
        """Canonical fine vertices as (T, 3, N_s) rows."""
        t = params.num_frames
        base = self.v_template + (params.betas @ self.shapedirs).view(-1, 3, self.num_coarse)
        v = base.expand(t, -1, -1).clone(memory_format=torch.contiguous_format)   # (T, 3, V)
        v.index_add_(2, self.expr_vertex_ids, (params.expression @ self.exprdirs).view(t, 3, -1))
        if rot_mats is not None:
            eye = torch.eye(3, dtype=v.dtype, device=v.device)
            feat = (rot_mats - eye).reshape(t, -1)
            v.index_add_(2, self.pose_vertex_ids, (feat @ self.posedirs).view(t, 3, -1))
        fine = self._upsample_rows(v.view(t * 3, self.num_coarse)).view(t, 3, -1)
        if static_offsets is not None:   # (N_s, 3), or (T, N_s, 3) when frames mix identities
            fine = fine.add_(static_offsets.reshape(-1, self.num_vertices, 3).transpose(1, 2))
        if dynamic_offsets is not None:
            fine = fine.index_add_(2, self.face_vertex_ids, dynamic_offsets.transpose(1, 2))
        return fine

    def canonical(self, params: HeadParams, static_offsets: Tensor | None = None,
                  dynamic_offsets: Tensor | None = None) -> Tensor:
        """Unposed personalized vertices (T, N_s, 3): blend shapes, B, offsets (no pose)."""
        return self._canonical_rows(params, static_offsets, dynamic_offsets, None).transpose(1, 2)

    def neutral(self, betas: Tensor, static_offsets: Tensor | None = None) -> Tensor:
        """V_neutral = B(V(β)) + Δg: zero expression, rest pose (1, N_s, 3)."""
        params = HeadParams.zeros(1, dtype=betas.dtype, device=betas.device)
        params.betas = betas.reshape(1, -1)
        return self.canonical(params, static_offsets)

    def forward(self, params: HeadParams, static_offsets: Tensor | None = None,
                dynamic_offsets: Tensor | None = None) -> HeadOutput:
        """Posed vertices for T frames. ``static_offsets``: Δg, (N_s, 3) or per frame
        (T, N_s, 3); ``dynamic_offsets``: Δf, (T, N_face, 3) on ``face_vertex_ids``."""
        local_rots, rot, joints, rel = self._pose_chain(params)
        fine = self._canonical_rows(params, static_offsets, dynamic_offsets, local_rots)
        tf = rel[:, self.skin_kin]                                    # (T, J, 3, 4)
        tf = torch.cat([tf[..., :3], tf[..., 3:] + params.transl[:, None, :, None]], -1)
        verts = self._skin(tf, fine).transpose(1, 2)                   # (T, N_s, 3) view
        joints = joints + params.transl[:, None]
        return HeadOutput(vertices=verts, joints=joints, landmarks=self.landmarks(verts, rot))

    def offset_map(self, params: HeadParams) -> tuple[Tensor, Tensor]:
        """Posed vertices without offsets (T, N_s, 3) and each vertex's skinning rotation
        (T, N_s, 3, 3): with shape, expression and pose fixed, canonical offsets map to
        ``base + R @ offset`` exactly (offsets are added before skinning)."""
        with torch.no_grad():
            t = params.num_frames
            _, _, _, rel = self._pose_chain(params)
            r_joint = rel[:, self.skin_kin, :3, :3]                           # (T, J, 3, 3)
            rots = torch.empty(t, self.num_vertices, 3, 3)
            for start, end, joint in self.skin_ranges:
                if joint >= 0:
                    rots[:, start:end] = r_joint[:, joint, None]
                else:
                    w = self.blend_weights                                      # (J, n)
                    rots[:, start:end] = torch.einsum("jn,tjab->tnab", w, r_joint)
            base = self.forward(params).vertices.contiguous()
        return base, rots

    def _skin(self, tf: Tensor, fine: Tensor) -> Tensor:
        """Skin (T, 3, N) rows with per-joint [R | t] (T, J, 3, 4): rigid ranges are one
        batched 3x3 product per frame, blended ones use interpolated per-vertex transforms."""
        t = fine.shape[0]
        parts = []
        for start, end, joint in self.skin_ranges:
            pts = fine[:, :, start:end]
            if joint >= 0:
                parts.append(torch.baddbmm(tf[:, joint, :, 3:], tf[:, joint, :, :3], pts))
                continue
            # (T, 12, J) @ (J, n): per-vertex [R | t] rows, row-major R then t.
            flat = torch.cat([tf[..., :3].reshape(t, -1, 9), tf[..., 3]], -1).transpose(1, 2)
            per_vertex = flat @ self.blend_weights                    # (T, 12, n)
            out = []
            for i in range(3):
                o = torch.addcmul(per_vertex[:, 9 + i], per_vertex[:, 3 * i], pts[:, 0])
                o = o.addcmul(per_vertex[:, 3 * i + 1], pts[:, 1])
                out.append(o.addcmul(per_vertex[:, 3 * i + 2], pts[:, 2]))
            parts.append(torch.stack(out, 1))
        return torch.cat(parts, 2) if len(parts) > 1 else parts[0]

    def landmarks(self, vertices: Tensor, rot_mats: Tensor) -> Tensor:
        """iBUG-68 landmarks (T, 68, 3) from posed vertices and the (T, 55, 3, 3) local
        rotations; the 17 contour points follow the head's yaw bin as in smplx (which uses
        the chain from the neck down; here the head joint is included, so a head turn moves
        the contour too)."""
        t = vertices.shape[0]
        dyn_faces, dyn_bary = find_dynamic_lmk_idx_and_bcoords(
            vertices, rot_mats, self.contour_lmk_faces, self.contour_lmk_bary,
            self.neck_kin_chain, pose2rot=False)
        faces = torch.cat([dyn_faces, self.static_lmk_faces.expand(t, -1)], 1)      # (T, 68)
        bary = torch.cat([dyn_bary, self.static_lmk_bary.expand(t, -1, -1)], 1)
        vids = self.lmk_face_vertices[faces]                                        # (T, 68, 3)
        tri = torch.gather(vertices, 1, vids.reshape(t, -1, 1).expand(-1, -1, 3)).view(t, 68, 3, 3)
        return (tri * bary[..., None]).sum(2)

    def to_trimesh(self, vertices: Tensor):
        """A ``trimesh.Trimesh`` of one frame (N_s, 3), for export as PLY or OBJ."""
        import trimesh
        return trimesh.Trimesh(vertices.detach().cpu().numpy(), self.faces.cpu().numpy(),
                               process=False)


class LandmarkHead(nn.Module):
    """iBUG-68 landmarks and joints of a :class:`PersonalizedHead` (no offsets), using only
    the coarse vertices of landmark triangles: linear blend skinning on a few hundred
    vertices instead of the whole mesh. Equal to the full model's landmarks (tested)."""

    def __init__(self, head: PersonalizedHead) -> None:
        super().__init__()
        d = head._landmark_data
        f32 = lambda a: torch.as_tensor(np.ascontiguousarray(a, dtype=np.float32))
        buf = lambda n, v: self.register_buffer(n, v, persistent=False)
        buf("v_template", f32(d["v_template"]))
        k = d["shapedirs"].shape[-1]
        buf("shapedirs", f32(d["shapedirs"].reshape(-1, k)))                  # (3 V_l, 400)
        buf("posedirs", f32(d["posedirs"].reshape(-1, d["posedirs"].shape[-1])))   # (3 V_l, 45)
        buf("weights", f32(d["weights"]))
        buf("skin_kin", head.skin_kin.clone())
        self.kinematics = head.kinematics
        buf("faces", torch.as_tensor(d["faces"]))          # -1 for faces not used here
        for name in ("static_lmk_faces", "static_lmk_bary", "contour_lmk_faces",
                     "contour_lmk_bary", "neck_kin_chain", "joint_template", "joint_dirs"):
            buf(name, getattr(head, name).clone())
        self.posed_joints = head.posed_joints
        self.num_vertices = len(d["v_template"])

    def forward(self, params: HeadParams) -> tuple[Tensor, Tensor]:
        """(landmarks (T, 68, 3), joints (T, 55, 3))."""
        t = params.num_frames
        local_rots, rot, joints, rel = _pose_chain(params, self.posed_joints, self.kinematics,
                                                   self.joint_template, self.joint_dirs)
        shape_expr = torch.cat([params.betas.expand(t, -1), params.expression], 1)
        eye = torch.eye(3, dtype=local_rots.dtype, device=local_rots.device)
        v = self.v_template + (shape_expr @ self.shapedirs.T).view(t, -1, 3)
        v = v + ((local_rots - eye).reshape(t, -1) @ self.posedirs.T).view(t, -1, 3)
        tf = torch.einsum("vj,tjab->tvab", self.weights, rel[:, self.skin_kin])
        verts = (tf[..., :3] * v.unsqueeze(-2)).sum(-1) + tf[..., 3]
        verts = verts + params.transl[:, None]
        dyn_faces, dyn_bary = find_dynamic_lmk_idx_and_bcoords(
            verts, rot, self.contour_lmk_faces, self.contour_lmk_bary, self.neck_kin_chain,
            pose2rot=False)
        faces = torch.cat([dyn_faces, self.static_lmk_faces.expand(t, -1)], 1)
        bary = torch.cat([dyn_bary, self.static_lmk_bary.expand(t, -1, -1)], 1)
        vids = self.faces[faces]                                              # (T, 68, 3)
        tri = torch.gather(verts, 1, vids.reshape(t, -1, 1).expand(-1, -1, 3)).view(t, 68, 3, 3)
        return (tri * bary[..., None]).sum(2), joints + params.transl[:, None]


class SurfacePointsHead(nn.Module):
    """Points on fixed faces of a :class:`PersonalizedHead` (no offsets): the coarse corners of
    those faces through a :class:`VertexSubsetHead`, then their barycentric combination."""

    def __init__(self, head: PersonalizedHead, faces: np.ndarray, bary: np.ndarray) -> None:
        super().__init__()
        sub_ids = head.submesh_face_ids.cpu()
        model_to_sub = torch.full((int(sub_ids.max()) + 1,), -1, dtype=torch.long)
        model_to_sub[sub_ids] = torch.arange(len(sub_ids))
        faces = torch.as_tensor(np.asarray(faces), dtype=torch.long)
        if faces.ndim != 1 or np.shape(bary) != (len(faces), 3):
            raise ValueError(f"surface points are (L,) faces and (L, 3) barycentric coordinates, got "
                             f"{tuple(faces.shape)} and {np.shape(bary)}")
        known = (faces >= 0) & (faces < len(model_to_sub))
        sub_faces = model_to_sub[faces[known]]
        if not known.all() or (sub_faces < 0).any():
            raise ValueError("surface points fall outside the head-and-torso region")
        corners = head.lmk_face_vertices.cpu()[sub_faces]                      # (L, 3) fine vertex ids
        ids, local = torch.unique(corners, return_inverse=True)
        self.vertices = head.vertex_subset_model(ids.to(head.faces.device))
        self.register_buffer("corners", local.to(head.faces.device), persistent=False)
        self.register_buffer("bary", _f32(np.asarray(bary)).to(head.faces.device), persistent=False)

    def forward(self, params: HeadParams) -> Tensor:
        """(T, L, 3) posed points."""
        tri = self.vertices(params)[:, self.corners]                          # (T, L, 3, 3)
        return (tri * self.bary[None, :, :, None]).sum(2)


class VertexSubsetHead(nn.Module):
    """Posed vertices (no offsets) of a subset of a :class:`PersonalizedHead`'s fine vertices:
    the template, shape, expression and pose-corrective blend shapes upsampled onto the subset
    once, then the same kinematics and blend skinning. Equal to the full forward's vertices
    (tested); the cost scales with the subset."""

    def __init__(self, head: PersonalizedHead, vertex_ids: Tensor) -> None:
        super().__init__()
        ids = torch.as_tensor(vertex_ids, device=head.faces.device)
        buf = lambda n, v: self.register_buffer(n, v.contiguous(), persistent=False)
        m = len(ids)

        def on_subset(rows: Tensor, coarse_ids: Tensor | None = None) -> Tensor:
            """(K, 3 V_c) rows on coarse vertices ``coarse_ids`` (all when None) -> (K, 3 M)."""
            k = rows.shape[0]
            full = rows.view(k, 3, -1)
            if coarse_ids is not None:
                full = torch.zeros(k, 3, head.num_coarse, dtype=rows.dtype, device=rows.device)
                full[:, :, coarse_ids] = rows.view(k, 3, -1)
            return head._upsample_rows(full.reshape(k * 3, -1)).view(k, 3, -1)[:, :, ids].reshape(k, 3 * m)

        with torch.no_grad():
            buf("v_template", on_subset(head.v_template.reshape(1, -1)).view(3, m))
            buf("shapedirs", on_subset(head.shapedirs))
            buf("exprdirs", on_subset(head.exprdirs, head.expr_vertex_ids))
            buf("posedirs", on_subset(head.posedirs, head.pose_vertex_ids))
            weights = torch.zeros(len(head.skin_kin), head.num_vertices, device=ids.device)
            for start, end, joint in head.skin_ranges:
                if joint >= 0:
                    weights[joint, start:end] = 1.0
                else:
                    weights[:, start:end] = head.blend_weights
            buf("weights", weights[:, ids])                                   # (J, M)
        for name in ("skin_kin", "joint_template", "joint_dirs"):
            buf(name, getattr(head, name).clone())
        self.kinematics, self.posed_joints, self.num_vertices = head.kinematics, head.posed_joints, m

    def forward(self, params: HeadParams) -> Tensor:
        """(T, M, 3) posed vertices."""
        t, m = params.num_frames, self.num_vertices
        local_rots, _, _, rel = _pose_chain(params, self.posed_joints, self.kinematics,
                                            self.joint_template, self.joint_dirs)
        eye = torch.eye(3, dtype=local_rots.dtype, device=local_rots.device)
        v = self.v_template + (params.betas @ self.shapedirs).view(-1, 3, m)
        v = v + (params.expression @ self.exprdirs).view(t, 3, m)
        v = v + ((local_rots - eye).reshape(t, -1) @ self.posedirs).view(t, 3, m)     # (T, 3, M)
        tf = rel[:, self.skin_kin]                                            # (T, J, 3, 4)
        per_vertex = tf.reshape(t, -1, 12).transpose(1, 2) @ self.weights    # (T, 12, M)
        per_vertex = per_vertex.view(t, 3, 4, m)
        out = (per_vertex[:, :, :3] * v[:, None]).sum(2) + per_vertex[:, :, 3]
        return (out + params.transl[:, :, None]).transpose(1, 2)


def _rest_landmarks(model: SMPLXModelData) -> np.ndarray:
    """iBUG-68 landmark positions of the template (contour from the frontal bin 0)."""
    tri = model.v_template[model.f]
    static = np.einsum("lk,lkj->lj", model.lmk_bary_coords, tri[model.lmk_faces_idx])
    contour = np.einsum("lk,lkj->lj", model.dynamic_lmk_bary_coords[0],
                        tri[model.dynamic_lmk_faces_idx[0]])
    return np.concatenate([contour, static])


@dataclass
class HeadConfig:
    """How to build the head: the SMPL-X file (``model_path`` or ``$EXPPORTRAIT_SMPLX_PATH``)
    and the representation's resolution."""

    model_path: str | None = None
    subdivision_levels: int = 1
    region_threshold: float = 0.5

    def build(self) -> PersonalizedHead:
        from .resolve import head_model_path
        return PersonalizedHead.from_file(head_model_path(self.model_path),
                                          subdivision_levels=self.subdivision_levels,
                                          region_threshold=self.region_threshold)
