"""Procedural head-and-shoulders surface for the synthetic SMPL-X-format model.

The surface is the zero level of a signed distance field made of smooth primitives (cranium,
face, nose, lips, ears, neck, torso, ...). It is sampled by casting rays from two interior
centres: a spherical grid for the head (star-shaped around ``HEAD_CENTRE``) and one for the
neck and torso (around ``TORSO_CENTRE``), joined at a ring on the neck. On top of that grid:
a mouth slit on one ring (upper and lower lip vertices coincide at rest and part when the
jaw opens) closed by an inner-mouth cavity, two eyeballs seated in shallow sockets, and a flat
bottom cap whose interior vertex count makes the total exactly the SMPL-X vertex count.

Units are metres; y is up, z points out of the face, x towards the subject's left.
Everything here is deterministic (no random numbers).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import Delaunay

HEAD_CENTRE = np.array([0.0, 0.185, 0.0])
TORSO_CENTRE = np.array([0.0, -0.05, -0.012])
MOUTH_Y = 0.1425            # lip crease height
MOUTH_HALF_WIDTH = 0.024    # lip corners at x = +-this
EYE_CENTRE_XY = (0.032, 0.214)
EYEBALL_RADIUS = 0.0125
BOTTOM_Y = -0.33
NECK_JUNCTION_Y = 0.07       # the head and torso grids meet on this neck ring
NECK_AXIS_Z = -0.012
HEAD_BLEND_THETA = np.deg2rad(148.0)  # head rings below this bend towards the neck ring

# Vertex parts.
SKIN, MOUTH, LEFT_EYE, RIGHT_EYE = 0, 1, 2, 3


# --------------------------------------------------------------------------------------------
# signed distance field
def _ellipsoid(p: np.ndarray, centre, radii) -> np.ndarray:
    radii = np.asarray(radii, dtype=np.float64)
    q = (p - np.asarray(centre)) / radii
    k0 = np.sqrt(np.einsum("...i,...i->...", q, q))
    q1 = q / radii
    k1 = np.sqrt(np.einsum("...i,...i->...", q1, q1))
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-12)


def _mirror_x(p: np.ndarray) -> np.ndarray:
    q = p.copy()
    q[..., 0] = np.abs(q[..., 0])
    return q


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b * (1.0 - h) + a * h - k * h * (1.0 - h)


def _smax(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    return -_smin(-a, -b, k)


def _vertical_capsule(p, x, z, y0, y1, rx, rz) -> np.ndarray:
    r = min(rx, rz)
    q = np.stack([(p[..., 0] - x) / rx, (p[..., 1] - np.clip(p[..., 1], y0, y1)) / r,
                  (p[..., 2] - z) / rz], axis=-1)
    return (np.sqrt(np.einsum("...i,...i->...", q, q)) - 1.0) * r


def _superellipsoid(p, centre, radii, n) -> np.ndarray:
    q = np.abs((p - np.asarray(centre)) / np.asarray(radii))
    return ((q ** n).sum(-1) ** (1.0 / n) - 1.0) * min(radii)


def head_sdf(p: np.ndarray, eye_sockets: bool = True) -> np.ndarray:
    """Signed distance (approximate, negative inside) of the procedural bust at points p."""
    m = _mirror_x(p)
    d = _ellipsoid(p, (0, 0.212, -0.012), (0.077, 0.102, 0.097))            # cranium
    d = _smin(d, _ellipsoid(p, (0, 0.166, 0.018), (0.066, 0.086, 0.077)), 0.02)   # face
    d = _smin(d, _ellipsoid(m, (0.034, 0.118, 0.035), (0.03, 0.03, 0.04)), 0.02)  # jaw
    d = _smin(d, _ellipsoid(p, (0, 0.108, 0.056), (0.026, 0.021, 0.027)), 0.015)  # chin
    d = _smin(d, _ellipsoid(m, (0.042, 0.174, 0.047), (0.026, 0.022, 0.028)), 0.018)  # cheeks
    d = _smin(d, _ellipsoid(p, (0, 0.234, 0.057), (0.056, 0.011, 0.024)), 0.014)  # brow ridge
    d = _smin(d, _ellipsoid(p, (0, 0.199, 0.083), (0.0085, 0.028, 0.013)), 0.008)  # bridge
    d = _smin(d, _ellipsoid(p, (0, 0.176, 0.097), (0.0125, 0.012, 0.013)), 0.008)  # tip
    d = _smin(d, _ellipsoid(m, (0.0115, 0.172, 0.086), (0.0085, 0.0075, 0.009)), 0.005)  # alae
    d = _smin(d, _ellipsoid(p, (0, 0.1485, 0.085), (0.025, 0.0075, 0.009)), 0.006)  # upper lip
    d = _smin(d, _ellipsoid(p, (0, 0.1362, 0.082), (0.022, 0.008, 0.0095)), 0.006)  # lower lip
    d = _smin(d, _ellipsoid(m, (0.077, 0.19, -0.014), (0.012, 0.03, 0.018)), 0.006)  # ears
    d = _smin(d, _vertical_capsule(p, 0.0, -0.012, -0.05, 0.15, 0.056, 0.05), 0.02)  # neck
    torso = _superellipsoid(p, (0, -0.19, -0.02), (0.2, 0.2, 0.105), 3.0)
    d = _smin(d, torso, 0.04)
    d = np.maximum(d, BOTTOM_Y - p[..., 1])                                   # flat bottom
    if eye_sockets:
        socket = _ellipsoid(m, (EYE_CENTRE_XY[0], EYE_CENTRE_XY[1], 0.087), (0.0165, 0.0085, 0.01))
        d = _smax(d, -socket, 0.003)
    return d


def raycast(origins: np.ndarray, dirs: np.ndarray, eye_sockets: bool = True,
            r_max: float = 0.45, steps: int = 180, iters: int = 30) -> np.ndarray:
    """Distance along each ray from an interior origin to where it first leaves the surface."""
    origins = np.broadcast_to(origins, dirs.shape)
    t = np.linspace(0.0, r_max, steps)
    pts = origins[:, None, :] + t[None, :, None] * dirs[:, None, :]
    inside = head_sdf(pts.reshape(-1, 3), eye_sockets).reshape(len(dirs), steps) < 0
    if not inside[:, 0].all():
        raise ValueError("raycast origin outside the surface")
    first_out = np.argmin(inside, axis=1)
    if not (~inside).any(axis=1).all():
        raise ValueError("raycast did not leave the surface within r_max")
    lo, hi = t[first_out - 1], t[first_out]
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        inn = head_sdf(origins + mid[:, None] * dirs, eye_sockets) < 0
        lo, hi = np.where(inn, mid, lo), np.where(inn, hi, mid)
    return 0.5 * (lo + hi)


def front_surface_point(x: np.ndarray, y: np.ndarray, eye_sockets: bool = True) -> np.ndarray:
    """Surface points seen from the front (+z) at the given x, y (first hit of a -z ray)."""
    x, y = np.atleast_1d(x).astype(float), np.atleast_1d(y).astype(float)
    z = np.linspace(0.2, -0.05, 180)
    pts = np.stack(np.broadcast_arrays(x[:, None], y[:, None], z[None, :]), -1)
    inside = head_sdf(pts.reshape(-1, 3), eye_sockets).reshape(len(x), len(z)) < 0
    first = np.argmax(inside, axis=1)
    lo, hi = z[first], z[np.maximum(first - 1, 0)]        # lo inside, hi outside
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        inn = head_sdf(np.stack([x, y, mid], -1), eye_sockets) < 0
        lo, hi = np.where(inn, mid, lo), np.where(inn, hi, mid)
    return np.stack([x, y, 0.5 * (lo + hi)], -1)


def horizontal_surface_point(y: np.ndarray, azimuth: np.ndarray) -> np.ndarray:
    """Surface points hit by horizontal rays from the head's vertical axis at height y."""
    y, azimuth = np.broadcast_arrays(np.atleast_1d(y), np.atleast_1d(azimuth))
    origins = np.stack([np.zeros_like(y), y, np.zeros_like(y)], -1).astype(float)
    dirs = np.stack([np.sin(azimuth), np.zeros_like(y), np.cos(azimuth)], -1)
    return origins + raycast(origins, dirs)[:, None] * dirs


# --------------------------------------------------------------------------------------------
# grid construction
def _density_quantiles(u: np.ndarray, lo: float, hi: float, density) -> np.ndarray:
    """Map quantiles u in [0, 1] to [lo, hi] under a piecewise density (inverse CDF)."""
    grid = np.linspace(lo, hi, 20001)
    pdf = density(grid)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (pdf[1:] + pdf[:-1]) * np.diff(grid))])
    return np.interp(u * cdf[-1], cdf, grid)


def _spherical_dirs(theta: np.ndarray, phi: np.ndarray) -> np.ndarray:
    return np.stack([np.sin(theta) * np.sin(phi), np.cos(theta), np.sin(theta) * np.cos(phi)], -1)


@dataclass
class ProceduralMesh:
    vertices: np.ndarray        # (V, 3)
    faces: np.ndarray           # (F, 3), outward winding
    part: np.ndarray            # (V,) SKIN / MOUTH / LEFT_EYE / RIGHT_EYE
    lower_lip: np.ndarray       # (V,) bool: lower copies of the mouth slit
    cavity_t: np.ndarray        # (V,) position along the cavity loop in (0, 1); -1 elsewhere
    upper_slit: np.ndarray      # (n,) vertex ids of the slit, upper side (corners included)
    lower_slit: np.ndarray      # (n,) same, lower side (corners shared with upper)
    eye_centres: np.ndarray     # (2, 3): left (+x), right (-x)
    socket_depth: np.ndarray    # (V,) how far the eye sockets pushed each skin vertex in


def build_procedural_mesh(num_vertices: int, n_phi: int = 128, n_head_rings: int = 62,
                          n_torso_rings: int = 12, cavity_steps: int = 8,
                          eye_rings: int = 12, eye_segments: int = 16) -> ProceduralMesh:
    """Build the bust with exactly ``num_vertices`` vertices (the bottom cap absorbs the rest)."""
    phi = _column_azimuths(n_phi)
    head, head_socket, top, junction, mouth_ring = _head_grid(phi, n_head_rings)
    torso, edge = _torso_grid(junction, n_torso_rings)
    grid = np.concatenate([head, torso], 0)                     # (R, n_phi, 3)
    n_rings = grid.shape[0]
    mesh = _MeshParts(n_phi)
    mesh.add_vertices(top[None], np.zeros(1))
    mesh.add_vertices(grid.reshape(-1, 3), np.concatenate([head_socket.ravel(), np.zeros(n_torso_rings * n_phi)]))
    j0, j1, lower_id = _mouth_slit(mesh, grid, mouth_ring)
    _grid_faces(mesh, n_rings, n_head_rings, mouth_ring, lower_id)
    upper, lower, cavity_t_vals = _mouth_cavity(mesh, grid, mouth_ring, j0, j1, lower_id, cavity_steps)
    eye_centres = [_eyeball(mesh, sx, eye_rings, eye_segments) for sx in (1.0, -1.0)]   # left (+x) then right
    _bottom_cap(mesh, edge, n_rings, num_vertices)

    vertices = np.concatenate(mesh.verts).astype(np.float64)
    assert len(vertices) == num_vertices, (len(vertices), num_vertices)
    faces_arr = np.concatenate(mesh.faces).astype(np.int64)
    refs = np.concatenate(mesh.ref)
    faces_arr = _orient(vertices, faces_arr, refs[:, :3], refs[:, 3] > 0.5)

    part = np.full(num_vertices, SKIN, dtype=np.int64)
    cav_start = 1 + n_rings * n_phi + (j1 - j0 - 1)
    n_cav = len(cavity_t_vals)
    part[cav_start:cav_start + n_cav] = MOUTH
    eye_n = eye_rings * eye_segments + 2
    part[cav_start + n_cav:cav_start + n_cav + eye_n] = LEFT_EYE
    part[cav_start + n_cav + eye_n:cav_start + n_cav + 2 * eye_n] = RIGHT_EYE
    lower_lip = np.zeros(num_vertices, bool)
    lower_lip[list(lower_id.values())] = True
    cavity_t = np.full(num_vertices, -1.0)
    cavity_t[cav_start:cav_start + n_cav] = cavity_t_vals
    return ProceduralMesh(vertices=vertices, faces=faces_arr, part=part, lower_lip=lower_lip,
                          cavity_t=cavity_t, upper_slit=upper, lower_slit=lower,
                          eye_centres=np.array(eye_centres),
                          socket_depth=np.concatenate(mesh.socket))


class _MeshParts:
    """The bust as it is assembled: vertex blocks (with their eye-socket depth) and face blocks
    (each face with a point its outward normal points away from, or towards when ``inward``)."""

    def __init__(self, n_phi: int) -> None:
        self.n_phi = n_phi
        self.verts: list[np.ndarray] = []
        self.socket: list[np.ndarray] = []
        self.faces: list[np.ndarray] = []
        self.ref: list[np.ndarray] = []
        self.count = 0

    def add_vertices(self, pts: np.ndarray, socket: np.ndarray | None = None) -> int:
        """Append vertices; returns the id of the first."""
        base = self.count
        self.verts.append(pts)
        self.socket.append(socket if socket is not None else np.zeros(len(pts)))
        self.count += len(pts)
        return base

    def add(self, tris: np.ndarray, centre: np.ndarray, inward: bool = False) -> None:
        centre = np.broadcast_to(centre, (len(tris), 3))
        self.faces.append(tris)
        self.ref.append(np.concatenate([centre, np.full((len(tris), 1), float(inward))], 1))

    def gid(self, i, j):
        """Id of grid vertex (ring ``i``, column ``j``); vertex 0 is the top."""
        return 1 + i * self.n_phi + (j % self.n_phi)


def _column_azimuths(n_phi: int) -> np.ndarray:
    """Column azimuths: dense over the face (|phi| < 80 deg), symmetric, phi = 0 included."""
    face_half = np.deg2rad(80.0)
    u = np.arange(n_phi) / n_phi
    return _density_quantiles(u, -np.pi, np.pi, lambda a: np.where(np.abs(a) < face_half, 1.0, 0.3))


def _head_grid(phi: np.ndarray, n_head_rings: int):
    """Head rings: (points (n_head_rings, n_phi, 3), their eye-socket depth, the top vertex, the
    neck junction ring (n_phi, 3), the index of the ring snapped onto the lip crease)."""
    n_phi = len(phi)
    # Dense over the face elevations; one ring snapped onto the lip crease.
    lip_front = horizontal_surface_point(np.array([MOUTH_Y]), np.array([0.0]))[0]
    off = lip_front - HEAD_CENTRE
    theta_mouth = np.arccos(off[1] / np.linalg.norm(off))
    # The junction: a horizontal ring on the neck; its elevation seen from the head centre
    # varies with azimuth, so the lowest head rings bend from constant elevation towards it.
    neck_origin = np.array([0.0, NECK_JUNCTION_Y, NECK_AXIS_Z])
    neck_dirs = np.stack([np.sin(phi), np.zeros(n_phi), np.cos(phi)], -1)
    junction = neck_origin + raycast(neck_origin, neck_dirs)[:, None] * neck_dirs
    jrel = junction - HEAD_CENTRE
    theta_junction = np.arccos(jrel[:, 1] / np.linalg.norm(jrel, axis=1))
    n_free = n_head_rings - 1
    uu = np.arange(1, n_free + 1) / n_free
    theta_1d = _density_quantiles(uu, 0.0, theta_junction.min(),
                                  lambda a: np.where((a > np.deg2rad(55)) & (a < np.deg2rad(150)),
                                                     1.0, 0.35))
    mouth_ring = int(np.argmin(np.abs(theta_1d - theta_mouth)))
    theta_1d[mouth_ring] = theta_mouth
    theta = np.repeat(theta_1d[:, None], n_phi, 1)
    bend = np.where(theta_1d > HEAD_BLEND_THETA)[0]
    if len(bend):
        w = (bend - bend[0] + 1) / (n_free - bend[0] + 1)   # reaches 1 on the junction ring
        theta[bend] = HEAD_BLEND_THETA + w[:, None] * (theta_junction[None] - HEAD_BLEND_THETA)
    pp = np.repeat(phi[None], n_free, 0)
    dirs = _spherical_dirs(theta.ravel(), pp.ravel())
    r = raycast(HEAD_CENTRE, dirs)
    head = (HEAD_CENTRE + r[:, None] * dirs).reshape(n_free, n_phi, 3)
    head = np.concatenate([head, junction[None]], 0)
    r_nosocket = raycast(HEAD_CENTRE, dirs, eye_sockets=False)
    head_socket = np.concatenate([(r_nosocket - r).reshape(n_free, n_phi), np.zeros((1, n_phi))])
    top = HEAD_CENTRE + raycast(HEAD_CENTRE, np.array([[0.0, 1.0, 0.0]]))[0] * np.array([0, 1.0, 0])
    return head, head_socket, top, junction, mouth_ring


def _torso_grid(junction: np.ndarray, n_torso_rings: int) -> tuple[np.ndarray, np.ndarray]:
    """Torso rings from the junction ring (the last head ring) down to the bottom edge:
    (points (n_torso_rings, n_phi, 3), the bottom edge ring (n_phi, 3))."""
    n_phi = len(junction)
    rel = junction - TORSO_CENTRE
    theta0 = np.arccos(rel[:, 1] / np.linalg.norm(rel, axis=1))
    phi_t = np.arctan2(rel[:, 0], rel[:, 2])
    edge_origin = np.array([0.0, BOTTOM_Y + 1e-4, TORSO_CENTRE[2]])
    edge_dirs = np.stack([np.sin(phi_t), np.zeros(n_phi), np.cos(phi_t)], -1)
    edge = edge_origin + raycast(edge_origin, edge_dirs)[:, None] * edge_dirs
    edge[:, 1] = BOTTOM_Y
    erel = edge - TORSO_CENTRE
    theta_edge = np.arccos(erel[:, 1] / np.linalg.norm(erel, axis=1))
    s = (np.arange(1, n_torso_rings + 1) / n_torso_rings) ** 1.35  # denser at the shoulders
    torso = np.empty((n_torso_rings, n_phi, 3))
    for k in range(n_torso_rings - 1):
        th = theta0 + (theta_edge - theta0) * s[k]
        dk = _spherical_dirs(th, phi_t)
        torso[k] = TORSO_CENTRE + raycast(TORSO_CENTRE, dk)[:, None] * dk
    torso[-1] = edge
    return torso, edge


def _mouth_slit(mesh: _MeshParts, grid: np.ndarray, mouth_ring: int) -> tuple[int, int, dict[int, int]]:
    """The slit: the mouth ring's columns within the lip corners (j0..j1); the interior ones get
    a lower copy (appended). Returns (j0, j1, column -> its lower copy's id)."""
    ring_pts = grid[mouth_ring]
    slit_cols = np.where((np.abs(ring_pts[:, 0]) <= MOUTH_HALF_WIDTH) & (ring_pts[:, 2] > 0))[0]
    j0, j1 = int(slit_cols.min()), int(slit_cols.max())
    interior = np.arange(j0 + 1, j1)
    base = mesh.add_vertices(grid[mouth_ring, interior])
    return j0, j1, {int(j): base + k for k, j in enumerate(interior)}


def _grid_faces(mesh: _MeshParts, n_rings: int, n_head_rings: int, mouth_ring: int,
                lower_id: dict[int, int]) -> None:
    """The top cap and the grid's quads (two triangles each), head then torso."""
    n_phi, gid = mesh.n_phi, mesh.gid
    mesh.add(np.array([[0, gid(0, j), gid(0, j + 1)] for j in range(n_phi)]), HEAD_CENTRE)
    head_tris, torso_tris = [], []
    for i in range(n_rings - 1):
        for j in range(n_phi):
            a, b, c, d = gid(i, j), gid(i, j + 1), gid(i + 1, j + 1), gid(i + 1, j)
            if i == mouth_ring:   # quads just below the slit use the lower copies
                a = lower_id.get(j, a)
                b = lower_id.get((j + 1) % n_phi, b)
            (head_tris if i < n_head_rings - 1 else torso_tris).extend([[a, b, c], [a, c, d]])
    mesh.add(np.array(head_tris), HEAD_CENTRE)
    mesh.add(np.array(torso_tris), TORSO_CENTRE)


def _mouth_cavity(mesh: _MeshParts, grid: np.ndarray, mouth_ring: int, j0: int, j1: int,
                  lower_id: dict[int, int], cavity_steps: int):
    """Inner-mouth cavity: a loop from each upper slit vertex back into the mouth to its lower
    copy. Returns (upper slit ids, lower slit ids, each cavity vertex's position along its loop)."""
    gid = mesh.gid
    upper = np.array([gid(mouth_ring, j) for j in range(j0, j1 + 1)])
    lower = np.array([lower_id.get(j, gid(mouth_ring, j)) for j in range(j0, j1 + 1)])
    cav_t = np.arange(1, cavity_steps + 1) / (cavity_steps + 1)
    paths, cavity_pts, cavity_tv = [], [], []
    n_next = mesh.count
    for col, j in enumerate(range(j0, j1 + 1)):
        if j in lower_id:
            base = grid[mouth_ring, j]
            frac = np.sqrt(max(0.0, 1.0 - (base[0] / MOUTH_HALF_WIDTH) ** 2))
            ids = n_next + np.arange(cavity_steps)
            n_next += cavity_steps
            pts = np.stack([base[0] * (1 - 0.25 * np.sin(np.pi * cav_t)),
                            base[1] + 0.008 * frac * np.sin(2 * np.pi * cav_t),
                            base[2] - 0.024 * frac * np.sin(np.pi * cav_t)], -1)
            cavity_pts.append(pts)
            cavity_tv.append(cav_t)
            paths.append(np.concatenate([[upper[col]], ids, [lower[col]]]))
        else:
            paths.append(np.full(cavity_steps + 2, upper[col]))
    cav_tris = []
    for a_path, b_path in zip(paths[:-1], paths[1:]):
        for k in range(cavity_steps + 1):
            for tri in ([a_path[k], a_path[k + 1], b_path[k + 1]],
                        [a_path[k], b_path[k + 1], b_path[k]]):
                if len(set(tri)) == 3:
                    cav_tris.append(tri)
    mesh.add_vertices(np.concatenate(cavity_pts))
    # Each loop encloses the mouth's air: cavity normals point to the loop's centre line.
    cav_tris = np.array(cav_tris)
    cav_x = np.concatenate(mesh.verts)[cav_tris].mean(1)[:, 0]
    lip_z = np.interp(cav_x, grid[mouth_ring, j0:j1 + 1, 0], grid[mouth_ring, j0:j1 + 1, 2])
    mesh.add(cav_tris, np.stack([cav_x, np.full_like(cav_x, MOUTH_Y), lip_z - 0.01], -1), inward=True)
    return upper, lower, np.concatenate(cavity_tv)


def _eyeball(mesh: _MeshParts, sx: float, eye_rings: int, eye_segments: int) -> np.ndarray:
    """An eyeball (``sx`` +1: left, -1: right): a UV sphere with the pole on +z (the pupil),
    seated in its socket. Returns its centre."""
    ex, ey = sx * EYE_CENTRE_XY[0], EYE_CENTRE_XY[1]
    front = front_surface_point(np.array([ex]), np.array([ey]), eye_sockets=False)[0]
    centre = np.array([ex, ey, front[2] - 0.0015 - EYEBALL_RADIUS])
    lat = np.pi * np.arange(1, eye_rings + 1) / (eye_rings + 1)
    lon = 2 * np.pi * np.arange(eye_segments) / eye_segments
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    sph = np.stack([np.sin(la) * np.cos(lo), np.sin(la) * np.sin(lo), np.cos(la)], -1)
    pts = np.concatenate([[[0, 0, 1.0]], sph.reshape(-1, 3), [[0, 0, -1.0]]])
    base = mesh.add_vertices(centre + EYEBALL_RADIUS * pts)

    def eid(i, j):
        return base + 1 + i * eye_segments + (j % eye_segments)
    tris = [[base, eid(0, j), eid(0, j + 1)] for j in range(eye_segments)]
    for i in range(eye_rings - 1):
        for j in range(eye_segments):
            tris += [[eid(i, j), eid(i + 1, j), eid(i + 1, j + 1)],
                     [eid(i, j), eid(i + 1, j + 1), eid(i, j + 1)]]
    back = base + len(pts) - 1
    tris += [[back, eid(eye_rings - 1, j + 1), eid(eye_rings - 1, j)]
             for j in range(eye_segments)]
    mesh.add(np.array(tris), centre)
    return centre


def _bottom_cap(mesh: _MeshParts, edge: np.ndarray, n_rings: int, num_vertices: int) -> None:
    """Bottom cap: the last torso ring plus the remaining vertices as interior points (a
    sunflower spiral), triangulated flat (normal -y)."""
    n_cap = num_vertices - mesh.count
    if n_cap < 1:
        raise ValueError(f"grid too dense: {mesh.count} vertices before the bottom cap, "
                         f"{num_vertices} allowed")
    ring = edge
    centre_xz = ring[:, [0, 2]].mean(0)
    gold = np.pi * (3.0 - np.sqrt(5.0))
    k = np.arange(n_cap)
    rad = 0.93 * np.sqrt((k + 0.5) / n_cap)
    ang = k * gold
    ring_ang = np.arctan2(ring[:, 0] - centre_xz[0], ring[:, 2] - centre_xz[1])
    ring_rad = np.linalg.norm(ring[:, [0, 2]] - centre_xz, axis=1)
    order = np.argsort(ring_ang)
    a_sorted = np.concatenate([ring_ang[order] - 2 * np.pi, ring_ang[order], ring_ang[order] + 2 * np.pi])
    r_sorted = np.tile(ring_rad[order], 3)
    wrapped = np.arctan2(np.sin(ang), np.cos(ang))
    rr = rad * np.interp(wrapped, a_sorted, r_sorted)
    cap = np.stack([centre_xz[0] + rr * np.sin(ang), np.full(n_cap, BOTTOM_Y),
                    centre_xz[1] + rr * np.cos(ang)], -1)
    cap_base = mesh.add_vertices(cap)
    ring_ids = np.array([mesh.gid(n_rings - 1, j) for j in range(mesh.n_phi)])
    all_ids = np.concatenate([ring_ids, cap_base + k])
    tri2d = Delaunay(np.concatenate([ring[:, [0, 2]], cap[:, [0, 2]]])).simplices
    mesh.add(all_ids[tri2d], np.array([0.0, BOTTOM_Y + 1.0, 0.0]))


def _orient(vertices: np.ndarray, faces: np.ndarray, centres: np.ndarray,
            inward: np.ndarray) -> np.ndarray:
    """Flip triangles whose normal points towards (or, for ``inward``, away from) ``centres``."""
    tri = vertices[faces]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    outward = np.einsum("ij,ij->i", normal, tri.mean(1) - centres) > 0
    flip = outward == inward
    faces = faces.copy()
    faces[flip] = faces[flip][:, [0, 2, 1]]
    return faces
