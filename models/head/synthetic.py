"""A synthetic head-and-shoulders model in the exact SMPL-X file format.

``build_synthetic_model(seed)`` returns :class:`SMPLXModelData` that ``smplx.SMPLX`` loads
unmodified (10,475 vertices, 55 joints, 300 shape + 100 expression directions, 486 pose
correctives, the 51 + 17 landmark embedding). The geometry comes from
:mod:`models.head.procedural_mesh`; this module rigs it:

- skinning weights on spine3, collars, neck, head, jaw and eyes, so the jaw opens the mouth
  and nothing on the torso follows the head;
- a joint regressor that moves the joints with the shape (affine in anchor vertices);
- pose correctives for the jaw and neck;
- shape directions: the first ones are named (head size, width, face length, jaw width, nose,
  cheeks, eye spacing, brow ridge, chin, neck, shoulders, head depth, lips), then smooth
  random fields with decaying amplitude;
- expression directions, zero outside the face region: mouth open, smile, brow raise,
  blink, cheek puff, frown, pucker, mouth sideways, lip stretch, sneer, then smooth random
  local fields;
- landmarks: the 68 iBUG points (51 static, 17 contour points per yaw bin that slide to the
  silhouette as the head turns, as in the SMPL-X/FLAME look-up table).

The template is fixed; ``seed`` draws the random shape and expression fields.
"""
from __future__ import annotations

import numpy as np

from . import procedural_mesh as pm
from .regions import face_region, smoothstep
from .smplx_file import (JOINT, NUM_CONTOUR_BINS, NUM_EXPRESSION_COEFFS, NUM_JOINTS,
                         NUM_POSE_BASIS, NUM_SHAPE_COEFFS, SMPLX_PARENTS, SMPLXModelData)

NUM_VERTICES = 10475
SYNTHETIC_MODEL_VERSION = 1

SHAPE_NAMES = ("head_size", "head_width", "face_length", "jaw_width", "nose_size",
               "cheek_fullness", "eye_spacing", "brow_ridge", "chin_forward", "neck_thickness",
               "shoulder_width", "head_depth", "lip_thickness")
EXPRESSION_NAMES = ("mouth_open", "smile", "brow_raise", "blink", "cheek_puff", "frown",
                    "pucker", "mouth_sideways", "lip_stretch", "sneer")

# Vertex ids smplx reads as extra joints (smplx/vertex_ids.py, 'smplx').
SMPLX_VERTEX_IDS = {"nose": 9120, "reye": 9929, "leye": 9448, "rear": 616, "lear": 6}

# Rest positions of the 55 joints (metres). Body joints below the bust only need to exist.
_JOINT_REST = {
    0: (0, -0.62, -0.01), 1: (0.06, -0.70, -0.01), 2: (-0.06, -0.70, -0.01),
    3: (0, -0.50, -0.02), 4: (0.07, -1.08, 0), 5: (-0.07, -1.08, 0), 6: (0, -0.36, -0.03),
    7: (0.07, -1.48, -0.03), 8: (-0.07, -1.48, -0.03), 9: (0, -0.20, -0.03),
    10: (0.08, -1.53, 0.08), 11: (-0.08, -1.53, 0.08), 12: (0, 0.005, -0.02),
    13: (0.035, -0.03, -0.02), 14: (-0.035, -0.03, -0.02), 15: (0, 0.115, -0.012),
    16: (0.16, -0.06, -0.03), 17: (-0.16, -0.06, -0.03), 18: (0.42, -0.07, -0.04),
    19: (-0.42, -0.07, -0.04), 20: (0.66, -0.07, -0.04), 21: (-0.66, -0.07, -0.04),
    22: (0, 0.168, 0.0),
}


def gaussian(p: np.ndarray, centre, sigma) -> np.ndarray:
    """Anisotropic Gaussian bump exp(-|(p - centre) / sigma|^2 / 2) at points p (..., 3)."""
    d = (p - np.asarray(centre)) / np.asarray(sigma)
    return np.exp(-0.5 * (d ** 2).sum(-1))


# --------------------------------------------------------------------------------------------
def build_synthetic_model(seed: int = 0) -> SMPLXModelData:
    """Build the synthetic SMPL-X-format model (deterministic in ``seed``)."""
    rng = np.random.default_rng(seed)
    mesh = _reorder_for_smplx(pm.build_procedural_mesh(NUM_VERTICES))
    v = mesh.vertices
    weights = _skinning_weights(mesh)
    joints = _joint_rest_positions(mesh)
    j_regressor = _joint_regressor(mesh, joints)
    static_emb, contour_emb, landmarks = _landmark_embedding(mesh)
    face_mask, face_soft = face_region(v, landmarks, weights)
    shapedirs = np.concatenate([_shape_directions(mesh, landmarks, rng),
                                _expression_directions(mesh, landmarks, face_soft, rng)], 2)
    hands = {f"hands_components{s}": np.eye(45) for s in "lr"}
    hands.update({f"hands_mean{s}": np.zeros(45) for s in "lr"})
    f32 = lambda a: a.astype(np.float32)
    return SMPLXModelData(
        v_template=f32(machine_independent(v)),
        shapedirs=f32(shapedirs),
        posedirs=f32(_pose_correctives(mesh, landmarks)),
        J_regressor=f32(j_regressor),
        weights=f32(weights),
        kintree_table=np.stack([SMPLX_PARENTS, np.arange(NUM_JOINTS)]).astype(np.int64),
        f=mesh.faces,
        lmk_faces_idx=static_emb[0], lmk_bary_coords=f32(static_emb[1]),
        dynamic_lmk_faces_idx=contour_emb[0], dynamic_lmk_bary_coords=f32(contour_emb[1]),
        extras={**hands,
                "synthetic_version": np.array(SYNTHETIC_MODEL_VERSION),
                "synthetic_seed": np.array(seed),
                "synthetic_part": mesh.part,
                "synthetic_face_mask": face_mask})


def machine_independent(v: np.ndarray, decimals: int = 9) -> np.ndarray:
    """``v`` (metres) on a 1 nm grid, without negative zeros: NumPy's sin/cos differ in the last
    bit between CPUs (SIMD paths), which leaves coordinates on the symmetry plane at ±1e-18
    rather than 0; snapped, the float32 template is the same bytes everywhere, and so is the
    model key the shipped landmark calibration is found by."""
    return np.round(v, decimals) + 0.0


def _reorder_for_smplx(mesh: pm.ProceduralMesh) -> pm.ProceduralMesh:
    """Permute vertices so smplx's fixed vertex ids (nose, eyes, ears) land on those features."""
    v, part = mesh.vertices, mesh.part
    skin = part == pm.SKIN
    near_mid = skin & (np.abs(v[:, 0]) < 0.003) & (v[:, 1] > 0.15) & (v[:, 1] < 0.2)
    pupil = {side: np.nonzero(part == side)[0][0] for side in (pm.LEFT_EYE, pm.RIGHT_EYE)}
    ear_band = skin & (np.abs(v[:, 1] - 0.19) < 0.03)
    src = {"nose": np.nonzero(near_mid)[0][np.argmax(v[near_mid, 2])],
           "leye": pupil[pm.LEFT_EYE], "reye": pupil[pm.RIGHT_EYE],
           "lear": np.nonzero(ear_band)[0][np.argmax(v[ear_band, 0])],
           "rear": np.nonzero(ear_band)[0][np.argmin(v[ear_band, 0])]}
    order = np.arange(len(v))          # order[new] = old
    for name, target in SMPLX_VERTEX_IDS.items():
        cur = int(np.nonzero(order == src[name])[0][0])
        order[[cur, target]] = order[[target, cur]]
    new_of_old = np.empty_like(order)
    new_of_old[order] = np.arange(len(order))
    return pm.ProceduralMesh(
        vertices=v[order], faces=new_of_old[mesh.faces], part=part[order],
        lower_lip=mesh.lower_lip[order], cavity_t=mesh.cavity_t[order],
        upper_slit=new_of_old[mesh.upper_slit], lower_slit=new_of_old[mesh.lower_slit],
        eye_centres=mesh.eye_centres, socket_depth=mesh.socket_depth[order])


# --------------------------------------------------------------------------------------------
# rig
def _skinning_weights(mesh: pm.ProceduralMesh) -> np.ndarray:
    v, part = mesh.vertices, mesh.part
    x, y, z = v[:, 0], v[:, 1], v[:, 2]
    w = np.zeros((len(v), NUM_JOINTS))
    # Head versus neck versus torso, along the height (the chin reaches lower in front).
    y_eff = y + 0.6 * np.maximum(z, 0.0)
    head = smoothstep(0.06, 0.125, y_eff)
    torso = 1.0 - smoothstep(-0.03, 0.03, y)
    torso = np.minimum(torso, 1.0 - head)
    neck = 1.0 - head - torso
    # Jaw: the lower face in front of the hinge, and the lower lip.
    # Sharp at the lips, broad over the cheeks (the skin there stretches as the jaw opens).
    width = 0.006 + 0.024 * smoothstep(pm.MOUTH_HALF_WIDTH, pm.MOUTH_HALF_WIDTH + 0.015, np.abs(x))
    below_mouth = np.clip((pm.MOUTH_Y - y + 0.002) / (width + 0.002), 0.0, 1.0)
    below_mouth = below_mouth * below_mouth * (3.0 - 2.0 * below_mouth)
    front = smoothstep(-0.01, 0.03, z)
    jaw_share = np.where(mesh.lower_lip, 1.0, below_mouth * front)
    cav = part == pm.MOUTH
    jaw_share = np.where(cav, smoothstep(0.35, 0.65, mesh.cavity_t), jaw_share)
    head = np.where(cav, 1.0, head)
    neck, torso = np.where(cav, 0.0, neck), np.where(cav, 0.0, torso)
    w[:, JOINT["head"]] = head * (1.0 - jaw_share)
    w[:, JOINT["jaw"]] = head * jaw_share
    w[:, JOINT["neck"]] = neck
    collar = torso * 0.5 * smoothstep(0.04, 0.14, np.abs(x))
    w[:, JOINT["left_collar"]] = np.where(x > 0, collar, 0.0)
    w[:, JOINT["right_collar"]] = np.where(x <= 0, collar, 0.0)
    w[:, JOINT["spine3"]] = torso - collar
    for side, joint in ((pm.LEFT_EYE, "left_eye"), (pm.RIGHT_EYE, "right_eye")):
        w[part == side] = 0.0
        w[part == side, JOINT[joint]] = 1.0
    assert np.allclose(w.sum(1), 1.0)
    return w


def _joint_rest_positions(mesh: pm.ProceduralMesh) -> np.ndarray:
    joints = np.zeros((NUM_JOINTS, 3))
    for j, p in _JOINT_REST.items():
        joints[j] = p
    joints[JOINT["left_eye"]], joints[JOINT["right_eye"]] = mesh.eye_centres
    # Fingers: three joints per finger fanning out from each wrist.
    for base, wrist, sx in ((25, 20, 1.0), (40, 21, -1.0)):
        for finger in range(5):
            for k in range(3):
                joints[base + finger * 3 + k] = joints[wrist] + np.array(
                    [sx * (0.03 + 0.028 * (k + 1)), 0.0, 0.02 * (finger - 2)])
    return joints


def _joint_regressor(mesh: pm.ProceduralMesh, joints: np.ndarray) -> np.ndarray:
    """Rows reproduce ``joints`` at rest as affine combinations of nearby anchor vertices."""
    v, part = mesh.vertices, mesh.part
    skin = np.nonzero(part == pm.SKIN)[0]
    reg = np.zeros((NUM_JOINTS, len(v)))

    def group(point, k=8):
        d = np.linalg.norm(v[skin] - point, axis=1)
        return skin[np.argsort(d)[:k]]

    def anchors_around(y, spread_y):
        ring = pm.horizontal_surface_point(np.full(4, y), np.deg2rad([0.0, 90.0, 180.0, -90.0]))
        up = pm.horizontal_surface_point(np.array([y + spread_y]), np.array([0.0]))
        down = pm.horizontal_surface_point(np.array([y - spread_y]), np.array([180.0 * np.pi / 180]))
        return [group(p) for p in np.concatenate([ring, up, down])]

    local = {JOINT["head"]: anchors_around(0.115, 0.05), JOINT["neck"]: anchors_around(0.02, 0.04),
             JOINT["jaw"]: anchors_around(0.168, 0.04)}
    body = anchors_around(-0.2, 0.1)
    for j in range(NUM_JOINTS):
        if j in (JOINT["left_eye"], JOINT["right_eye"]):
            ids = np.nonzero(part == (pm.LEFT_EYE if j == JOINT["left_eye"] else pm.RIGHT_EYE))[0]
            reg[j, ids] = 1.0 / len(ids)    # a symmetric UV sphere averages to its centre
            continue
        groups = local.get(j, body)
        means = np.stack([v[g].mean(0) for g in groups], 1)          # (3, G)
        a = np.vstack([means, np.ones((1, len(groups)))])
        coef = np.linalg.lstsq(a, np.append(joints[j], 1.0), rcond=None)[0]
        for g, c in zip(groups, coef):
            reg[j, g] += c / len(g)
    assert np.allclose(reg @ v, joints, atol=1e-6)
    return reg


def _pose_correctives(mesh: pm.ProceduralMesh, landmarks: np.ndarray) -> np.ndarray:
    """Small corrective shapes driven by sin(angle) of jaw opening and neck pitch."""
    v = mesh.vertices
    posedirs = np.zeros((len(v), 3, NUM_POSE_BASIS))
    skin = (mesh.part == pm.SKIN)[:, None]
    sin_x = lambda joint: (joint - 1) * 9 + 2 * 3 + 1   # (R - I)[2, 1] = sin(rx)
    # Jaw open: cheeks beside the mouth draw in, the chin tissue tucks back slightly.
    cheek = sum(gaussian(v, (sx * 0.04, 0.145, 0.06), (0.015, 0.02, 0.03)) for sx in (1, -1))
    d_jaw = np.zeros_like(v)
    d_jaw[:, 0] = -np.sign(v[:, 0]) * 0.004 * cheek
    d_jaw[:, 2] = -0.003 * gaussian(v, landmarks[8], (0.02, 0.015, 0.03))
    posedirs[:, :, sin_x(JOINT["jaw"])] = d_jaw * skin
    # Neck pitch: the throat bulges forward.
    d_neck = np.zeros_like(v)
    d_neck[:, 2] = 0.006 * gaussian(v, (0, 0.07, 0.04), (0.03, 0.025, 0.02))
    posedirs[:, :, sin_x(JOINT["neck"])] = d_neck * skin
    return posedirs


# --------------------------------------------------------------------------------------------
# shape and expression directions
def _rigid_eyes(mesh: pm.ProceduralMesh, field) -> np.ndarray:
    """Evaluate a displacement field; eyeballs translate with the field at their centres."""
    d = field(mesh.vertices)
    for side, centre in ((pm.LEFT_EYE, mesh.eye_centres[0]), (pm.RIGHT_EYE, mesh.eye_centres[1])):
        d[mesh.part == side] = field(centre[None])[0]
    return d


def _random_blobs(rng, centres_pool, n_blobs, sigma_range):
    """Parameters of a smooth random field: Gaussian blobs with random 3D vectors."""
    return (centres_pool[rng.integers(0, len(centres_pool), n_blobs)],
            rng.uniform(*sigma_range, n_blobs), rng.normal(size=(n_blobs, 3)))


def _blob_field(p: np.ndarray, blobs) -> np.ndarray:
    centres, sigmas, vecs = blobs
    return sum(gaussian(p, c, s)[:, None] * vec for c, s, vec in zip(centres, sigmas, vecs))


def _shape_directions(mesh: pm.ProceduralMesh, lm: np.ndarray, rng) -> np.ndarray:
    v = mesh.vertices
    head_c = np.array([0.0, 0.19, 0.0])
    is_head = lambda p: smoothstep(0.07, 0.13, p[:, 1] + 0.6 * np.maximum(p[:, 2], 0))
    nose_c, chin = lm[30], lm[8]

    def scale_head(axis, amount):
        def f(p):
            d = np.zeros_like(p)
            d[:, axis] = amount * (p[:, axis] - head_c[axis]) * is_head(p)
            return d
        return f

    def along_normal_bump(centre, sigma, amount):
        def f(p):
            n = p - head_c
            n /= np.linalg.norm(n, axis=-1, keepdims=True)
            return amount * gaussian(p, centre, sigma)[:, None] * n
        return f

    def face_length(p):
        d = np.zeros_like(p)
        d[:, 1] = -0.006 * smoothstep(0.2, 0.1, p[:, 1]) * smoothstep(-0.02, 0.03, p[:, 2]) * is_head(p)
        return d

    def jaw_width(p):
        d = np.zeros_like(p)
        d[:, 0] = 0.1 * p[:, 0] * smoothstep(0.17, 0.12, p[:, 1]) * is_head(p)
        return d

    def eye_spacing(p):
        d = np.zeros_like(p)
        for sx in (1.0, -1.0):
            d[:, 0] += sx * 0.0025 * gaussian(p, (sx * 0.032, 0.214, 0.07), (0.014, 0.012, 0.03))
        return d

    def chin_forward(p):
        d = np.zeros_like(p)
        d[:, 2] = 0.005 * gaussian(p, chin, (0.025, 0.02, 0.04))
        return d

    def neck_thickness(p):
        d = np.zeros_like(p)
        band = smoothstep(-0.02, 0.03, p[:, 1]) * smoothstep(0.12, 0.08, p[:, 1])
        radial = p[:, [0, 2]] - np.array([0.0, pm.NECK_AXIS_Z])
        d[:, [0, 2]] = 0.12 * radial * band[:, None]
        return d

    def shoulder_width(p):
        d = np.zeros_like(p)
        d[:, 0] = 0.07 * p[:, 0] * smoothstep(0.03, -0.05, p[:, 1])
        return d

    def lip_thickness(p):
        d = np.zeros_like(p)
        d[:, 2] = 0.0025 * gaussian(p, (0, pm.MOUTH_Y, 0.085), (0.02, 0.008, 0.02))
        return d

    def head_size(p):
        return 0.035 * (p - np.array([0.0, 0.0, -0.01])) * is_head(p)[:, None]

    def cheek_fullness(p):
        return sum(along_normal_bump((sx * 0.045, 0.17, 0.05), (0.018, 0.018, 0.03), 0.0035)(p)
                   for sx in (1, -1))

    named = [head_size, scale_head(0, 0.05), face_length, jaw_width,
             along_normal_bump(nose_c, (0.012, 0.025, 0.03), 0.004), cheek_fullness, eye_spacing,
             along_normal_bump((0, 0.234, 0.07), (0.035, 0.008, 0.02), 0.003),
             chin_forward, neck_thickness, shoulder_width, scale_head(2, 0.05), lip_thickness]
    assert len(named) == len(SHAPE_NAMES)
    dirs = np.zeros((len(v), 3, NUM_SHAPE_COEFFS))
    for k, f in enumerate(named):
        dirs[:, :, k] = _rigid_eyes(mesh, f)
    skin_pts = v[mesh.part == pm.SKIN]
    for k in range(len(named), NUM_SHAPE_COEFFS):
        blobs = _random_blobs(rng, skin_pts, 4, (0.02, 0.06))
        d = _rigid_eyes(mesh, lambda p: _blob_field(p, blobs))
        dirs[:, :, k] = 0.003 * 0.985 ** (k - len(named)) * d / max(np.abs(d).max(), 1e-9)
    return dirs


def _expression_directions(mesh: pm.ProceduralMesh, lm: np.ndarray, soft: np.ndarray,
                           rng) -> np.ndarray:
    v = mesh.vertices
    x, y = v[:, 0], v[:, 1]
    skin = mesh.part == pm.SKIN
    corners = lm[[48, 54]]
    dirs = np.zeros((len(v), 3, NUM_EXPRESSION_COEFFS))

    def put(k, d):
        dirs[:, :, k] = d * soft[:, None]

    lower_side = mesh.lower_lip | ((mesh.part == pm.MOUTH) & (mesh.cavity_t > 0.5))
    mouth_w = smoothstep(pm.MOUTH_HALF_WIDTH + 0.01, pm.MOUTH_HALF_WIDTH - 0.004, np.abs(x))
    # 0 mouth open: lower lip and chin soft tissue drop, upper lip lifts.
    d = np.zeros_like(v)
    below = lower_side | (y < pm.MOUTH_Y)
    d[:, 1] = np.where(below, -0.004 * mouth_w * smoothstep(0.09, 0.135, y + 0.01 * lower_side),
                       0.0015 * mouth_w * smoothstep(0.165, 0.145, y))
    put(0, d)
    # 1 smile: corners up, out and back; cheeks rise.
    d = np.zeros_like(v)
    for c in corners:
        g = gaussian(v, c, (0.012, 0.012, 0.02))[:, None]
        d += g * np.array([np.sign(c[0]) * 0.003, 0.004, -0.002])
        d[:, 1] += 0.002 * gaussian(v, c + np.array([np.sign(c[0]) * 0.012, 0.025, -0.01]), (0.015, 0.012, 0.02))
    put(1, d)
    # 2 brow raise: brows and forehead up.
    d = np.zeros_like(v)
    brow_y = lm[17:27, 1].mean()
    d[:, 1] = 0.004 * smoothstep(brow_y - 0.018, brow_y - 0.004, y) * smoothstep(brow_y + 0.03, brow_y + 0.008, y)
    put(2, d)
    # 3 blink: lid skin in the sockets moves forward over the eyeballs, upper lids drop.
    depth = np.where(skin, mesh.socket_depth, 0.0)
    d = np.zeros_like(v)
    d[:, 2] = depth + 0.0015 * smoothstep(2e-4, 1e-3, depth)
    for c in mesh.eye_centres:
        region = gaussian(v[:, :2], c[:2], (0.016, 0.009))
        upper = smoothstep(c[1] - 0.004, c[1] + 0.006, y)
        d[:, 1] += region * (-0.0085 * upper + 0.0015 * (1.0 - upper))
    put(3, d)
    # 4 cheek puff.
    d = np.zeros_like(v)
    for sx in (1, -1):
        g = gaussian(v, (sx * 0.042, 0.15, 0.06), (0.016, 0.016, 0.03))[:, None]
        d += g * np.array([sx * 0.004, 0.0, 0.002])
    put(4, d)
    # 5 frown: inner brows down and together.
    d = np.zeros_like(v)
    for sx in (1, -1):
        g = gaussian(v, (sx * 0.016, brow_y, 0.08), (0.012, 0.01, 0.03))[:, None]
        d += g * np.array([-sx * 0.002, -0.003, 0.0])
    put(5, d)
    # 6 pucker: lips forward and narrower.
    d = np.zeros_like(v)
    g = gaussian(v, (0, pm.MOUTH_Y, 0.085), (0.02, 0.012, 0.03))
    d[:, 2] = 0.004 * g
    d[:, 0] = -0.25 * x * g
    put(6, d)
    # 7 mouth sideways.
    d = np.zeros_like(v)
    d[:, 0] = 0.004 * gaussian(v, (0, pm.MOUTH_Y, 0.085), (0.025, 0.014, 0.03))
    put(7, d)
    # 8 lip stretch: corners out and slightly down.
    d = np.zeros_like(v)
    for c in corners:
        d += gaussian(v, c, (0.012, 0.01, 0.02))[:, None] * np.array([np.sign(c[0]) * 0.004, -0.001, -0.001])
    put(8, d)
    # 9 sneer: sides of the nose up.
    d = np.zeros_like(v)
    for sx in (1, -1):
        d[:, 1] += 0.0025 * gaussian(v, (sx * 0.014, 0.18, 0.085), (0.008, 0.012, 0.02))
    put(9, d)
    face_pts = v[soft > 0.5]
    for k in range(len(EXPRESSION_NAMES), NUM_EXPRESSION_COEFFS):
        d = _blob_field(v, _random_blobs(rng, face_pts, 3, (0.01, 0.025)))
        amp = 0.0025 * 0.98 ** (k - len(EXPRESSION_NAMES))
        put(k, amp * d / max(np.abs(d * soft[:, None]).max(), 1e-9))
    return dirs


# --------------------------------------------------------------------------------------------
# landmarks
def _embed(points: np.ndarray, verts: np.ndarray, faces: np.ndarray,
           candidates: np.ndarray, k: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Nearest triangle (among ``candidates``) and barycentric coordinates for each point."""
    tri = verts[faces[candidates]]                               # (C, 3, 3)
    cen = tri.mean(1)
    near = np.argsort(((points[:, None] - cen[None]) ** 2).sum(-1), axis=1)[:, :k]   # (P, k)
    t = tri[near]                                                # (P, k, 3, 3)
    v0, v1 = t[:, :, 1] - t[:, :, 0], t[:, :, 2] - t[:, :, 0]
    v2 = points[:, None] - t[:, :, 0]
    dot = lambda a, b: np.einsum("pki,pki->pk", a, b)
    d00, d01, d11, d20, d21 = dot(v0, v0), dot(v0, v1), dot(v1, v1), dot(v2, v0), dot(v2, v1)
    den = d00 * d11 - d01 * d01
    bv = (d11 * d20 - d01 * d21) / den
    bw = (d00 * d21 - d01 * d20) / den
    bc = np.clip(np.stack([1 - bv - bw, bv, bw], -1), 0, None)
    bc /= bc.sum(-1, keepdims=True)
    dist = np.linalg.norm(np.einsum("pkj,pkji->pki", bc, t) - points[:, None], axis=-1)
    best = np.argmin(dist, axis=1)
    rows = np.arange(len(points))
    return candidates[near[rows, best]].astype(np.int64), bc[rows, best]


def _eye_landmarks(mesh: pm.ProceduralMesh) -> np.ndarray:
    """iBUG 36..47 on the lid margin: the outline of the eyeball's visible part."""
    out = []
    for centre, order in ((mesh.eye_centres[1], "right"), (mesh.eye_centres[0], "left")):
        xs = np.linspace(centre[0] - 0.02, centre[0] + 0.02, 41)
        ys = np.linspace(centre[1] - 0.012, centre[1] + 0.012, 49)
        tol = 0.51 * (xs[1] - xs[0])
        gx, gy = np.meshgrid(xs, ys)
        skin_z = pm.front_surface_point(gx.ravel(), gy.ravel())[:, 2]
        r2 = pm.EYEBALL_RADIUS ** 2 - (gx.ravel() - centre[0]) ** 2 - (gy.ravel() - centre[1]) ** 2
        eye_z = centre[2] + np.sqrt(np.clip(r2, 0, None))
        vis = (r2 > 0) & (eye_z > skin_z)
        px, py = gx.ravel()[vis], gy.ravel()[vis]
        x0, x1 = px.min(), px.max()
        xm = 0.5 * (x0 + x1)
        half = 0.5 * (x1 - x0)
        top = lambda xx: py[np.abs(px - xx) < tol].max()
        bot = lambda xx: py[np.abs(px - xx) < tol].min()
        xa, xb = xm - half / 3, xm + half / 3
        ymid = py[np.abs(px - x0) < tol].mean(), py[np.abs(px - x1) < tol].mean()
        if order == "right":  # 36 outer(-x) 37 38 upper 39 inner 40 41 lower
            pts = [(x0, ymid[0]), (xa, top(xa)), (xb, top(xb)), (x1, ymid[1]), (xb, bot(xb)), (xa, bot(xa))]
        else:                 # 42 inner(-x side) 43 44 upper 45 outer 46 47 lower
            pts = [(x0, ymid[0]), (xa, top(xa)), (xb, top(xb)), (x1, ymid[1]), (xb, bot(xb)), (xa, bot(xa))]
        pts = np.array(pts)
        out.append(pm.front_surface_point(pts[:, 0], pts[:, 1]))
    return np.concatenate(out)


def _contour_sections() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Jaw-line azimuths of iBUG 0..16 and, per point, its horizontal cross-section of the face."""
    alpha = np.linspace(-1.0, 1.0, 17)
    azim = np.deg2rad(78.0) * alpha
    height = 0.094 + (0.188 - 0.094) * np.abs(alpha) ** 1.7
    sweep = np.deg2rad(np.arange(0, 121)) * np.where(alpha < 0, -1.0, 1.0)[:, None]   # (17, 121)
    sweep = np.concatenate([azim[:, None], sweep], 1)            # column 0: the jaw-line point
    sections = pm.horizontal_surface_point(np.repeat(height, sweep.shape[1]), sweep.ravel())
    return alpha, sweep, sections.reshape(17, -1, 3)


def _contour_targets(yaw: float, alpha, sweep, sections) -> np.ndarray:
    """iBUG 0..16 for a head turned by ``yaw`` (rad, about +y): the jaw line where it is
    visible from the front, else the silhouette of its cross-section."""
    out = sections[:, 0].copy()
    for k in range(17):
        if k == 8:
            continue
        s = np.sign(alpha[k])
        x_rot = sections[k, 1:, 0] * np.cos(yaw) + sections[k, 1:, 2] * np.sin(yaw)
        sil = int(np.argmax(s * x_rot))
        if s * sweep[k, 0] > s * sweep[k, 1 + sil]:
            out[k] = sections[k, 1 + sil]
    return out


def _lip_edge_embedding(mesh: pm.ProceduralMesh, x_target: float, upper: bool):
    """Embed a point of the closed lip line on the upper- or lower-lip side faces."""
    v, f = mesh.vertices, mesh.faces
    line = mesh.upper_slit if upper else mesh.lower_slit
    xs = v[line, 0]
    order = np.argsort(xs)
    line, xs = line[order], xs[order]
    k = int(np.clip(np.searchsorted(xs, x_target) - 1, 0, len(line) - 2))
    a, b = line[k], line[k + 1]
    s = float(np.clip((x_target - xs[k]) / (xs[k + 1] - xs[k]), 0, 1))
    has = (f == a).any(1) & (f == b).any(1)
    for fid in np.nonzero(has)[0]:
        third = [u for u in f[fid] if u not in (a, b)][0]
        if mesh.part[third] != pm.SKIN:
            continue
        if (v[third, 1] > pm.MOUTH_Y) == upper:
            bary = np.array([(1 - s) if u == a else s if u == b else 0.0 for u in f[fid]])
            return fid, bary
    raise RuntimeError("lip edge face not found")


def _landmark_embedding(mesh: pm.ProceduralMesh):
    v, f, part = mesh.vertices, mesh.faces, mesh.part
    skin_faces = np.nonzero((part[f] == pm.SKIN).all(1) & (v[f][:, :, 1].min(1) > 0.06))[0]
    brow_x = np.array([-0.056, -0.046, -0.035, -0.024, -0.013])
    brow_y = np.array([0.229, 0.2345, 0.2365, 0.2355, 0.232])
    brows = pm.front_surface_point(np.concatenate([brow_x, -brow_x[::-1]]),
                                   np.concatenate([brow_y, brow_y[::-1]]))
    nose = pm.front_surface_point(np.array([0, 0, 0, 0, -0.013, -0.0065, 0, 0.0065, 0.013]),
                                  np.array([0.214, 0.204, 0.193, 0.179, 0.1665, 0.164, 0.163, 0.164, 0.1665]))
    eyes = _eye_landmarks(mesh)
    c = pm.MOUTH_HALF_WIDTH
    outer_x = np.array([-c, -0.016, -0.007, 0, 0.007, 0.016, c, 0.016, 0.007, 0, -0.007, -0.016])
    outer_y = np.array([pm.MOUTH_Y, 0.148, 0.1515, 0.1505, 0.1515, 0.148, pm.MOUTH_Y,
                        0.1345, 0.1305, 0.1298, 0.1305, 0.1345])
    outer = pm.front_surface_point(outer_x, outer_y)
    targets = np.concatenate([brows, nose, eyes, outer])            # iBUG 17..59
    fids, bary = _embed(targets, v, f, skin_faces)
    # Inner lips 60..67 on the slit: corners, then upper (61-63) and lower (65-67) sides.
    inner = [(-c, True), (-0.008, True), (0.0, True), (0.008, True), (c, True),
             (0.008, False), (0.0, False), (-0.008, False)]
    lip = [_lip_edge_embedding(mesh, np.clip(xx, -c + 1e-5, c - 1e-5) if abs(xx) < c else np.sign(xx) * c, up)
           for xx, up in inner]
    static_f = np.concatenate([fids, [fi for fi, _ in lip]])
    static_b = np.concatenate([bary, np.stack([b for _, b in lip])])
    # Contour look-up table in smplx's bin order: bin i <-> yaw -i deg (i <= 39), i - 39 deg.
    dyn_f = np.zeros((NUM_CONTOUR_BINS, 17), dtype=np.int64)
    dyn_b = np.zeros((NUM_CONTOUR_BINS, 17, 3))
    sections = _contour_sections()
    for i in range(NUM_CONTOUR_BINS):
        yaw_deg = -(i if i <= 39 else 39 - i)
        dyn_f[i], dyn_b[i] = _embed(_contour_targets(np.deg2rad(yaw_deg), *sections), v, f, skin_faces)
    tri = v[f]
    static_pts = np.einsum("lk,lkj->lj", static_b, tri[static_f])
    contour0 = np.einsum("lk,lkj->lj", dyn_b[0], tri[dyn_f[0]])
    landmarks = np.concatenate([contour0, static_pts])              # iBUG order, rest pose
    return (static_f, static_b), (dyn_f, dyn_b), landmarks
