"""Shape from shading for the personalized offsets: Δg and Δf from the frames themselves.

Image formation (per visible face-region vertex v of frame t, RGB in [0, 1])::

    I_tv = a_v ⊙ (Y(n_tv) · L_t)

with ``a_v`` a per-identity albedo on the head mesh, ``L_t`` (9, 3) per-frame second-order
spherical-harmonics lighting in camera space and ``Y`` the real SH basis of the vertex normal
(Lambertian irradiance; the usual low-order model of monocular face capture, e.g. Garrido et
al. 2013/2016, Suwajanakorn et al. 2014). The offsets are height fields along the neutral
canonical normal: Δg = h_g n, Δf(t) = h_t n. A small height field tilts the normal by minus
its surface gradient, ``n' ≈ n - ∇h``, so with shape, expression and pose fixed the shading is
linear in h after one linearization: ``δI_tv = -(∂I/∂n)_tv R_tv (G h)_v`` with ``G`` the mesh's
sparse gradient operator. Each Gauss-Newton round re-renders the vertex normals, re-samples
the frame where each vertex projects (mesh-to-image: no rasterization in the loop), solves
the lighting per frame and the albedo per vertex in closed form, then the offsets by
conjugate gradients, all frames at once.

Separation: the albedo is per identity and constant over the clip, so what changes between
frames at a vertex (after the per-frame lighting and the pose and expression already fitted)
is geometry: that is Δf, zero-mean over the clip, with a penalty on its component inside the
expression basis (what ψ can express is ψ's job), Laplacian, magnitude and temporal terms.
Static shading is ambiguous with albedo; Δg takes the part of it that a smooth albedo cannot
explain, on vertices whose free albedo keeps the smooth albedo's chromaticity (lips, brows
and other albedo edges change colour; shading changes brightness), and only along the normal.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from models.render.camera import Camera
from models.render.conditions import vertex_normals
from models.render.rasterizer import interpolate, rasterize_torch

from .mesh_solvers import conjugate_gradients, sample_maps, sub_laplacian

# Real SH basis constants (order 2).
_C0, _C1, _C2, _C3, _C4 = 0.282095, 0.488603, 1.092548, 0.315392, 0.546274


def sh_basis(n: Tensor) -> Tensor:
    """Real second-order spherical harmonics of unit normals (..., 3) -> (..., 9)."""
    x, y, z = n.unbind(-1)
    return torch.stack([torch.full_like(x, _C0), _C1 * y, _C1 * z, _C1 * x, _C2 * x * y, _C2 * y * z,
                        _C3 * (3 * z * z - 1), _C2 * x * z, _C4 * (x * x - y * y)], -1)


def sh_basis_jacobian(n: Tensor) -> Tensor:
    """d sh_basis / d n: (..., 9, 3)."""
    x, y, z = n.unbind(-1)
    o = torch.zeros_like(x)
    rows = [(o, o, o), (o, _C1 + o, o), (o, o, _C1 + o), (_C1 + o, o, o), (_C2 * y, _C2 * x, o),
            (o, _C2 * z, _C2 * y), (o, o, 6 * _C3 * z), (_C2 * z, o, _C2 * x), (2 * _C4 * x, -2 * _C4 * y, o)]
    return torch.stack([torch.stack(r, -1) for r in rows], -2)


def shade_vertices(albedo: Tensor, light: Tensor, normals: Tensor) -> Tensor:
    """Lambertian SH shading: albedo (N, 3) or (T, N, 3), light (T, 9, 3), unit normals
    (T, N, 3) -> RGB (T, N, 3)."""
    return albedo * (sh_basis(normals) @ light)


def gradient_operator(verts: Tensor, faces: Tensor, ids: Tensor) -> Tensor:
    """Sparse (3 M, M) surface-gradient operator of scalar fields on the vertices ``ids``
    (M of them) of a mesh: per-face gradients of the linear interpolant averaged onto the
    vertices with area weights. Rows are vertex-major (v*3 + axis); faces with a vertex
    outside ``ids`` are left out."""
    n = verts.shape[0]
    local = torch.full((n,), -1, dtype=torch.long)
    local[ids] = torch.arange(len(ids))
    f = faces[(local[faces] >= 0).all(1)]
    p = verts[f].double()                                            # (F, 3, 3)
    fn = torch.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], dim=-1)
    area2 = fn.norm(dim=-1).clamp(min=1e-18)                         # 2 A
    nrm = fn / area2[:, None]
    rows, cols, vals = [], [], []
    weight_sum = torch.zeros(len(ids), dtype=torch.float64).index_add_(
        0, local[f].reshape(-1), (area2 / 2).repeat_interleave(3))
    for i in range(3):
        j, k = (i + 1) % 3, (i + 2) % 3
        grad_i = torch.cross(nrm, p[:, k] - p[:, j], dim=-1) / area2[:, None]   # ∂(∇h)/∂h_i (F, 3)
        for corner in range(3):                     # add to every corner vertex's average
            v = local[f[:, corner]]
            w = (area2 / 2) / weight_sum[v]
            for axis in range(3):
                rows.append(v * 3 + axis)
                cols.append(local[f[:, i]])
                vals.append(w * grad_i[:, axis])
    g = torch.sparse_coo_tensor(torch.stack([torch.cat(rows), torch.cat(cols)]), torch.cat(vals).float(),
                                (3 * len(ids), len(ids))).coalesce()
    return g.to_sparse_csr()


@dataclass
class PhotometricConfig:
    rounds: int = 2                  # Gauss-Newton rounds (normals, colours, light, albedo, offsets)
    static_rounds: int = 1           # of which the first ones also update Δg
    light_albedo_iters: int = 2      # alternations of the closed-form light and albedo solves
    cg_iters: int = 20
    robust_sigma: float = 0.1        # RGB residual scale of the Cauchy weights
    w_dynamic: float = 1.0           # 0 disables the photometric Δf
    w_static: float = 1.0            # 0 disables the photometric Δg
    dyn_magnitude: float = 5e-4      # per mm² of height
    dyn_laplacian: float = 0.005
    dyn_temporal: float = 0.02
    dyn_expression: float = 0.05     # penalty on the part of Δf inside the expression basis
    static_magnitude: float = 5e-3
    static_laplacian: float = 0.5
    albedo_smooth: float = 30.0      # Laplacian weight of the smooth albedo for Δg
    chroma_sigma: float = 0.03       # chromaticity change that marks an albedo edge
    max_height_mm: float = 4.0       # clamp on |h| (offsets are detail, not shape)
    blur_px: float = 1.0             # Gaussian pre-blur of the frames (texture finer than the mesh)
    visibility_tol: float = 0.004    # metres behind the rendered surface that still counts as seen
    min_cos: float = 0.2             # vertices more grazing than this are not used


@dataclass
class PhotometricResult:
    static_height: Tensor            # (M,) mm along the neutral normal
    dynamic_height: Tensor           # (T, M) mm, zero-mean over frames
    albedo: Tensor                   # (M, 3)
    light: Tensor                    # (T, 9, 3)
    residual: Tensor                 # (T,) mean |RGB residual| over visible vertices, with Δf
    residual_no_dynamic: Tensor      # (T,) the same with Δf = 0 (same albedo and light)
    visible_fraction: Tensor         # (T,)


class PhotometricSolver:
    """Height fields on the face region of a head from the shading of the frames."""

    def __init__(self, head, config: PhotometricConfig | None = None) -> None:
        self.head = head
        self.config = config or PhotometricConfig()
        self.ids = head.face_vertex_ids
        m = len(self.ids)
        local = torch.full((head.num_vertices,), -1, dtype=torch.long, device=self.ids.device)
        local[self.ids] = torch.arange(m, device=self.ids.device)
        inner = (local[head.faces] >= 0).all(1)
        self.local_faces = local[head.faces[inner]]          # faces inside the face region, local ids
        self.near_faces = head.faces[(local[head.faces] >= 0).any(1)]
        lap = sub_laplacian(head.laplacian(), self.ids.cpu())
        self.lap2 = torch.sparse.mm(lap.t().coalesce(), lap).coalesce().to_sparse_csr().to(self.ids.device)   # LᵀL
        self._expr_cache: dict = {}

    # ------------------------------------------------------------------------------------------
    def neutral_frame(self, betas: Tensor, static_offsets: Tensor | None):
        """Neutral canonical face vertices (M, 3), their unit normals and the gradient
        operator (mm units: G h with h in mm gives the normal tilt)."""
        with torch.no_grad():
            neutral = self.head.neutral(betas, static_offsets)[0]
            normals = vertex_normals(neutral[None].contiguous(), self.head.faces)[0, self.ids]
            g = gradient_operator(neutral.cpu(), self.head.faces.cpu(), self.ids.cpu()).to(neutral.device)
        return neutral[self.ids], normals, g * 1e-3

    def expression_basis(self, normals: Tensor) -> Tensor:
        """Orthonormal (M, K) basis of the expression blend shapes' normal components on the
        face region (what ψ can express, as a height field)."""
        # Cached by content: a data_ptr key returned a stale basis when a freed tensor's memory
        # was reused by the next clip's normals (shards then depended on the worker's history).
        cached = self._expr_cache.get("normals")
        if cached is not None and cached.shape == normals.shape and torch.equal(cached, normals):
            return self._expr_cache["basis"]
        with torch.no_grad():
            along = (self.head.expression_directions(self.ids) * normals[None]).sum(-1).T   # (M, K) metres
            q = orthonormal_columns(along)
        self._expr_cache = {"normals": normals.detach().clone(), "basis": q}
        return q

    # ------------------------------------------------------------------------------------------
    def solve(self, base: Tensor, rots: Tensor, camera: Camera, images: Tensor, valid: Tensor | None,
              betas: Tensor, static_offsets: Tensor | None, fit_static: bool = True) -> PhotometricResult:
        """Heights from ``images`` (T, H, W, 3) in [0, 1] for the posed head without offsets
        ``base`` (T, N, 3) and skinning rotations ``rots`` (T, N, 3, 3) from
        ``PersonalizedHead.offset_map``; ``valid`` (T, H, W) marks pixels inside the source
        frame; ``static_offsets`` are the Δg already known (fixed when ``fit_static`` is off)."""
        cfg = self.config
        t = base.shape[0]
        ids = self.ids
        images = blur(images, cfg.blur_px)
        _, n_can, g = self.neutral_frame(betas, static_offsets)
        q = self.expression_basis(n_can)
        # Per vertex: canonical frame -> camera frame of each frame (T, M, 3, 3).
        r_cam = camera.R[:, None] @ rots[:, ids]                                   # (T, M, 3, 3)
        disp = (rots[:, ids] @ n_can[None, :, :, None])[..., 0]                    # (T, M, 3) world, m per m
        if static_offsets is not None:                 # the Δg already known (e.g. the identity's)
            base = base + (rots @ static_offsets[None, :, :, None])[..., 0]
        visible = self._visibility(base, camera, valid)
        h_s = torch.zeros(len(ids), device=base.device)
        h_d = torch.zeros(t, len(ids), device=base.device)
        albedo = light = None
        for round_ in range(cfg.rounds):
            colours, normals, w = self._observe(base, camera, images, visible, disp, h_s, h_d)
            albedo, light, smooth = self._light_albedo(colours, normals, w, albedo, light)
            if fit_static and cfg.w_static > 0 and round_ < cfg.static_rounds:
                w_s = w * self._chroma_weight(albedo, smooth)[None]
                h_s = h_s + self._solve_static(colours, normals, light, smooth, w_s, r_cam, g)
                h_s = h_s.clamp(-cfg.max_height_mm, cfg.max_height_mm)
                colours, normals, w = self._observe(base, camera, images, visible, disp, h_s, h_d)
                albedo, light, smooth = self._light_albedo(colours, normals, w, albedo, light)
            if cfg.w_dynamic > 0:
                h_d = h_d + self._solve_dynamic(colours, normals, light, albedo, w, r_cam, g, q)
                h_d = (h_d - h_d.mean(0, keepdim=True)).clamp(-cfg.max_height_mm, cfg.max_height_mm)
        colours, normals, w = self._observe(base, camera, images, visible, disp, h_s, h_d)
        res = self._residual(colours, normals, w, albedo, light)
        colours0, normals0, w0 = self._observe(base, camera, images, visible, disp, h_s,
                                               torch.zeros_like(h_d))
        res0 = self._residual(colours0, normals0, w0, albedo, light)
        return PhotometricResult(static_height=h_s, dynamic_height=h_d, albedo=albedo, light=light,
                                 residual=res, residual_no_dynamic=res0,
                                 visible_fraction=visible.float().mean(1))

    def offsets(self, result: PhotometricResult, normals: Tensor, num_vertices: int):
        """(Δg (N, 3), Δf (T, M, 3)) in metres from the heights and the neutral normals."""
        static = torch.zeros(num_vertices, 3, device=normals.device)
        static[self.ids] = result.static_height[:, None] * normals * 1e-3
        return static, result.dynamic_height[..., None] * normals[None] * 1e-3

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _visibility(self, verts, camera: Camera, valid) -> Tensor:
        """(T, M) face vertices not hidden by the face region itself, inside the image and
        the valid crop (offsets move vertices by millimetres: visibility of the base holds)."""
        cfg = self.config
        vc = camera.to_camera(verts)
        uv = camera.project(vc)
        h, w = camera.image_size
        uvz = torch.cat([uv, vc[..., 2:]], -1)
        vis = []
        for fr in torch.arange(verts.shape[0]).split(16):
            face_idx = rasterize_torch(uvz[fr], self.near_faces, (h, w), True)
            depth, _ = interpolate(uvz[fr], vc[fr][..., 2:], self.near_faces, face_idx)
            d = sample_maps(depth, uv[fr][:, self.ids])[..., 0]
            z = vc[fr][:, self.ids, 2]
            ok = (d > 0) & (z - d < cfg.visibility_tol)
            if valid is not None:
                ok &= sample_maps(valid[fr].float()[..., None], uv[fr][:, self.ids], "nearest")[..., 0] > 0.5
            vis.append(ok)
        return torch.cat(vis)

    @torch.no_grad()
    def observe(self, verts, camera, images, visible):
        """Colours (T, M, 3) where the face vertices of the posed mesh ``verts`` (T, N, 3)
        project, their camera normals (T, M, 3) and data weights (T, M): ``visible`` and
        facing the camera, weighted by how squarely."""
        ids = self.ids
        vc = camera.to_camera(verts)
        normals = vertex_normals(vc, self.near_faces)[:, ids]
        colours = sample_maps(images, camera.project(vc[:, ids]))
        facing = -(normals * torch.nn.functional.normalize(vc[:, ids], dim=-1)).sum(-1)
        w = (visible & (facing > self.config.min_cos)).float() * facing.clamp(0, 1)
        return colours, normals, w

    def _observe(self, base, camera, images, visible, disp, h_s, h_d):
        """:meth:`observe` of the base mesh displaced by the heights."""
        with torch.no_grad():
            h = (h_s[None] + h_d) * 1e-3                                             # (T, M) m
            verts = base.clone()
            verts[:, self.ids] = verts[:, self.ids] + disp * h[..., None]
        return self.observe(verts, camera, images, visible)

    def _light_albedo(self, colours, normals, w, albedo, light):
        """Per-frame SH light (9, 3) and albedo. The light is solved against a smooth albedo
        (a constant one at first, then one under a strong Laplacian prior): a free per-vertex
        albedo would explain all shading and leave the light flat. The free per-vertex albedo
        is solved last, given the light. Returns (free albedo, light, smooth albedo)."""
        cfg = self.config
        y = sh_basis(normals)                                                        # (T, M, 9)
        seen = w.sum(0) > 0
        if light is None:
            med = colours[w > 0].median(0).values if (w > 0).any() else colours.new_full((3,), 0.5)
            smooth = med.expand(colours.shape[1], 3).clone()
        else:
            smooth = self._smooth_albedo(colours, normals, light, w)
        for it in range(cfg.light_albedo_iters):
            wr = w * self._robust(colours, normals, smooth, light) if light is not None else w
            light = self._solve_light(y, colours, smooth, wr)
            smooth = self._smooth_albedo(colours, normals, light, wr)
        wr = w * self._robust(colours, normals, smooth, light)
        s = y @ light                                                                   # shading (T, M, 3)
        albedo = ((wr[..., None] * s * colours).sum(0) /
                  (wr[..., None] * s * s).sum(0).clamp(min=1e-6)).clamp(0.0, 1.5)
        albedo[~seen] = smooth[~seen]
        return albedo, light, smooth

    @staticmethod
    def _solve_light(y, colours, albedo, wr):
        """Weighted least squares for the per-frame SH light (T, 9, 3) given the albedo."""
        wc = wr[..., None] * albedo[None]                                              # (T, M, 3)
        yt = y.transpose(1, 2)                                                          # (T, 9, M)
        ata = torch.stack([(yt * (wc[..., c] * albedo[None, :, c])[:, None]) @ y for c in range(3)], 1)
        atb = yt @ (wc * colours)                                                       # (T, 9, 3)
        ata = ata + 1e-4 * torch.eye(9, dtype=ata.dtype, device=ata.device)
        return torch.linalg.solve(ata, atb.transpose(1, 2)[..., None])[..., 0].transpose(1, 2)

    def _robust(self, colours, normals, albedo, light) -> Tensor:
        r = (shade_vertices(albedo, light, normals) - colours).norm(dim=-1)
        s = self.config.robust_sigma
        return s * s / (s * s + r * r)                  # Cauchy IRLS weights

    def _residual(self, colours, normals, w, albedo, light) -> Tensor:
        r = (shade_vertices(albedo, light, normals) - colours).abs().mean(-1)
        vis = (w > 0).float()
        return (r * vis).sum(1) / vis.sum(1).clamp(min=1)

    def _smooth_albedo(self, colours, normals, light, w) -> Tensor:
        """Albedo under a strong Laplacian prior: what it cannot explain of the static
        shading is left to Δg."""
        s = sh_basis(normals) @ light
        d = (w[..., None] * s * s).sum(0)                                              # (M, 3)
        b = (w[..., None] * s * colours).sum(0)
        lam = self.config.albedo_smooth * w.sum(0).mean().clamp(min=1e-3)
        mv = lambda x: d * x + lam * (self.lap2 @ x)
        x0 = b / d.clamp(min=1e-6)
        return x0 + conjugate_gradients(mv, b - mv(x0), self.config.cg_iters * 2, d + lam * 4.0)

    def _chroma_weight(self, albedo, smooth) -> Tensor:
        chroma = lambda a: a / a.sum(-1, keepdim=True).clamp(min=1e-4)
        dc = (chroma(albedo) - chroma(smooth)).norm(dim=-1)
        return torch.exp(-0.5 * (dc / self.config.chroma_sigma) ** 2)

    def _linear_system(self, colours, normals, light, albedo, w, r_cam):
        """Per frame and vertex: J (T, M, 3 ch, 3) with δI = J (G h)_v (canonical gradient),
        residual (T, M, 3) and robust weights (T, M)."""
        dy = sh_basis_jacobian(normals)                                              # (T, M, 9, 3)
        dshade = torch.einsum("tkc,tmkj->tmcj", light, dy)                           # (T, M, 3, 3)
        alb = albedo if albedo.dim() == 3 else albedo[None]
        j = -(alb[..., None] * dshade) @ r_cam                                       # (T, M, 3, 3)
        r = shade_vertices(albedo, light, normals) - colours
        wr = w * self._robust(colours, normals, albedo, light)
        return j, r, wr

    def _solve_static(self, colours, normals, light, albedo, w, r_cam, g) -> Tensor:
        cfg = self.config
        j, r, wr = self._linear_system(colours, normals, light, albedo, w, r_cam)
        t, m = wr.shape
        wj = j * wr[..., None, None] * cfg.w_static / t
        blocks = torch.einsum("tmci,tmcj->mij", wj, j)                               # (M, 3, 3)
        rhs = -torch.einsum("tmci,tmc->mi", wj, r)                                   # (M, 3)
        gt = _transpose(g)
        b = gt @ rhs.reshape(-1, 1)

        def mv(x):
            gx = (g @ x).view(m, 3)
            data = gt @ (blocks @ gx[..., None]).reshape(-1, 1)
            return data + cfg.static_magnitude * x + cfg.static_laplacian * (self.lap2 @ x)

        diag = _gtdg_diag(g, blocks.diagonal(dim1=-2, dim2=-1)) + cfg.static_magnitude + cfg.static_laplacian * 4.0
        return conjugate_gradients(mv, b, cfg.cg_iters, diag[:, None])[:, 0]

    def _solve_dynamic(self, colours, normals, light, albedo, w, r_cam, g, q) -> Tensor:
        """One Gauss-Newton step for the per-frame heights (T, M): shading data term,
        magnitude, Laplacian, temporal and expression-basis penalties (vertex-major (M, T)
        layout inside CG: no transposes in the matrix-vector product)."""
        cfg = self.config
        j, r, wr = self._linear_system(colours, normals, light, albedo, w, r_cam)
        t, m = wr.shape
        wj = j * wr[..., None, None] * cfg.w_dynamic
        blocks = torch.einsum("tmci,tmcj->mijt", wj, j).contiguous()                 # (M, 3, 3, T)
        rhs = -torch.einsum("tmci,tmc->mit", wj, r).reshape(m * 3, t)                # (3M, T)
        gt = _transpose(g)
        b = gt @ rhs                                                                 # (M, T)
        gam = cfg.dyn_temporal

        def temporal(x):                                                             # DᵀD along time
            if x.shape[1] < 2:
                return torch.zeros_like(x)
            d = x[:, 1:] - x[:, :-1]
            out = torch.zeros_like(x)
            out[:, 1:] += d
            out[:, :-1] -= d
            return out

        def mv(x):                                                                   # x (M, T)
            gx = (g @ x).view(m, 1, 3, t)
            data = gt @ (blocks * gx).sum(2).view(m * 3, t)
            return data + cfg.dyn_magnitude * x + cfg.dyn_laplacian * (self.lap2 @ x) + gam * temporal(x) \
                + cfg.dyn_expression * (q @ (q.T @ x))

        diag = _gtdg_diag(g, blocks.diagonal(dim1=1, dim2=2).permute(1, 0, 2)).T \
            + cfg.dyn_magnitude + cfg.dyn_laplacian * 4.0 + 2 * gam
        return conjugate_gradients(mv, b, cfg.cg_iters, diag).T


# ----------------------------------------------------------------------------------------------
def orthonormal_columns(a: Tensor) -> Tensor:
    """An orthonormal basis (rows, K') of the span of the columns of ``a`` (rows, K)."""
    q, r = torch.linalg.qr(a.double())
    keep = r.diagonal().abs() > 1e-9 * r.diagonal().abs().max()
    return q[:, keep].to(a.dtype)


def blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (T, H, W, C) images (edges replicated)."""
    if sigma <= 0:
        return images
    r = max(1, int(math.ceil(2.5 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=images.dtype, device=images.device) / sigma) ** 2)
    k = k / k.sum()
    t, h, w, c = images.shape
    x = images.permute(0, 3, 1, 2).reshape(t * c, 1, h, w)
    x = torch.nn.functional.pad(x, (r, r, r, r), mode="replicate")
    x = torch.nn.functional.conv2d(x, k.view(1, 1, 1, -1))
    x = torch.nn.functional.conv2d(x, k.view(1, 1, -1, 1))
    return x.view(t, c, h, w).permute(0, 2, 3, 1)


def _transpose(g: Tensor) -> Tensor:
    return g.to_sparse_coo().t().coalesce().to_sparse_csr()


def _gtdg_diag(g: Tensor, d: Tensor) -> Tensor:
    """diag(Gᵀ D G) for a diagonal D given per row, (..., M, 3) -> (..., M) (the Jacobi
    preconditioner)."""
    coo = g.to_sparse_coo().coalesce()
    rows, cols = coo.indices()
    vals = coo.values()
    flat = d.reshape(*d.shape[:-2], -1)
    out = torch.zeros(*d.shape[:-2], g.shape[1], dtype=d.dtype, device=d.device)
    return out.index_add_(-1, cols, vals * vals * flat[..., rows])
