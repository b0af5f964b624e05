"""Synthetic identities: shape, static offsets Δg, albedo, and identity-dependent detail.

Every identity has an ``age`` in [0, 1]. Age shows in the neutral geometry (sagging cheeks
and jowls, deeper nasolabial folds, under-eye bags: part of Δg) and sets how deep the
expression wrinkles are (the detail bases). So the true Δf of two identities under the same
(ψ, jaw) differ in a way a model can read off the neutral mesh V_neutral = B(V(β)) + Δg, and a
direct copy of the driver's Δf gets it wrong.

Detail model: Δf(i) = Σ_c coeff_c(ψ_i, jaw_i) · basis_c, with ``detail_coefficients`` a fixed
function of the expression and ``basis`` (C, N_face, 3) the identity's wrinkle patterns.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.head import procedural_mesh as pm
from models.head.head_model import PersonalizedHead
from models.head.regions import smoothstep
from models.head.synthetic import gaussian
from models.render.conditions import vertex_normals

DETAIL_COMPONENTS = ("forehead_wrinkles", "nasolabial_fold", "crows_feet", "chin_dimpling",
                     "frown_lines")


@dataclass
class RestInfo:
    """Attributes of the template's fine mesh (β = 0) shared by every identity."""

    vertices: np.ndarray       # (N_s, 3) rest positions
    normals: np.ndarray        # (N_s, 3)
    part: np.ndarray           # (N_s,) SKIN / MOUTH / LEFT_EYE / RIGHT_EYE
    landmarks: np.ndarray      # (68, 3) rest iBUG landmarks
    face_ids: np.ndarray       # (N_face,) face-region vertex ids
    eye_centres: np.ndarray    # (2, 3) left, right

    @classmethod
    def from_head(cls, head: PersonalizedHead, part_coarse_full: np.ndarray) -> "RestInfo":
        from models.head.head_model import HeadParams
        with torch.no_grad():
            out = head(HeadParams.zeros(1))
            rest = out.vertices[0].contiguous()
            normals = vertex_normals(rest[None], head.faces)[0]
            part_sub = part_coarse_full[head.submesh_vertex_ids.numpy()]
            onehot = torch.nn.functional.one_hot(torch.as_tensor(part_sub), 4).float()[None]
            part = head.upsample(onehot)[0].argmax(-1).numpy()
        eyes = out.joints[0, [23, 24]].numpy()
        return cls(vertices=rest.numpy().astype(np.float64), normals=normals.numpy().astype(np.float64),
                   part=part, landmarks=out.landmarks[0].numpy().astype(np.float64),
                   face_ids=head.face_vertex_ids.numpy(), eye_centres=eyes.astype(np.float64))


@dataclass
class Identity:
    identity_id: str
    betas: np.ndarray            # (300,)
    age: float
    static_offsets: np.ndarray   # (N_s, 3) Δg
    detail_basis: np.ndarray     # (C, N_face, 3)
    albedo: np.ndarray           # (N_s, 3) uint8
    hair_thickness: float
    skin_rgb: np.ndarray
    hair_rgb: np.ndarray

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"betas": self.betas.astype(np.float32), "age": np.float32(self.age),
                "static_offsets": self.static_offsets.astype(np.float32),
                "detail_basis": self.detail_basis.astype(np.float32), "albedo": self.albedo,
                "hair_thickness": np.float32(self.hair_thickness),
                "skin_rgb": self.skin_rgb.astype(np.float32), "hair_rgb": self.hair_rgb.astype(np.float32)}

    @classmethod
    def from_arrays(cls, identity_id: str, a) -> "Identity":
        return cls(identity_id=identity_id, betas=a["betas"], age=float(a["age"]),
                   static_offsets=a["static_offsets"], detail_basis=a["detail_basis"],
                   albedo=a["albedo"], hair_thickness=float(a["hair_thickness"]),
                   skin_rgb=a["skin_rgb"], hair_rgb=a["hair_rgb"])


def detail_coefficients(expression: np.ndarray | torch.Tensor,
                        jaw_pose: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Per-frame weights (T, C) of the detail bases: a fixed function of (ψ, jaw)."""
    lib = torch if isinstance(expression, torch.Tensor) else np
    relu = (lambda x: x.clamp(min=0)) if lib is torch else (lambda x: np.maximum(x, 0))
    e = expression
    jaw_open = relu(jaw_pose[:, 0])
    cols = [relu(e[:, 2]),                                   # forehead: brow raise
            relu(e[:, 1]) + 0.5 * relu(e[:, 4]),             # nasolabial: smile, cheek puff
            relu(e[:, 1]) * 0.7 + 0.6 * relu(e[:, 3]),       # crow's feet: smile, squint/blink
            relu(e[:, 6]) + 2.0 * jaw_open,                  # chin: pucker, mouth opening
            relu(e[:, 5])]                                   # frown lines: frown
    return lib.stack(cols, 1)


def _smooth_noise_field(rng, p, n_blobs, sigma, amplitude, pool=None):
    """Smooth random field on points ``p``; blob centres drawn from ``pool`` (default p)."""
    pool = p if pool is None else pool
    centres = pool[rng.integers(0, len(pool), n_blobs)]
    vec = rng.normal(size=(n_blobs, 3))
    sig = rng.uniform(*sigma, n_blobs)
    d = sum(gaussian(p, c, s)[:, None] * v for c, s, v in zip(centres, sig, vec))
    return amplitude * d / max(np.linalg.norm(d, axis=1).max(), 1e-12)


def _hair_region(rest: RestInfo) -> np.ndarray:
    """Soft scalp mask (N_s,): above a hairline over the forehead, down the back of the head."""
    v, lm = rest.vertices, rest.landmarks
    brow_y = lm[17:27, 1].mean()
    front_line = brow_y + 0.045 - 0.012 * (np.abs(v[:, 0]) / 0.07) ** 2   # hairline, receding at temples
    side = smoothstep(brow_y + 0.0, brow_y + 0.02, v[:, 1]) * smoothstep(0.02, -0.01, v[:, 2])
    top = smoothstep(front_line - 0.004, front_line + 0.004, v[:, 1])
    back = smoothstep(0.135, 0.16, v[:, 1]) * smoothstep(-0.01, -0.04, v[:, 2])
    scalp = np.maximum(np.maximum(top, side * smoothstep(0.16, 0.2, v[:, 1])), back)
    return scalp * (rest.part == pm.SKIN)


def _age_sag(rest: RestInfo, age: float) -> np.ndarray:
    v, lm = rest.vertices, rest.landmarks
    d = np.zeros_like(v)
    for c in lm[[48, 54]]:                                   # jowls beside the mouth corners
        g = gaussian(v, c + np.array([np.sign(c[0]) * 0.018, -0.02, -0.01]), (0.015, 0.02, 0.03))
        d[:, 1] -= 0.004 * g
        d[:, 0] += np.sign(c[0]) * 0.0015 * g
    for c in lm[[31, 35]]:                                   # nasolabial folds
        g = gaussian(v, c + np.array([np.sign(c[0]) * 0.014, -0.012, -0.008]), (0.006, 0.014, 0.02))
        d[:, 2] -= 0.002 * g
    for eye in rest.eye_centres:                             # under-eye bags
        g = gaussian(v, eye + np.array([0.0, -0.014, 0.01]), (0.012, 0.005, 0.02))
        d[:, 2] += 0.0012 * g
    return age * d * (rest.part == pm.SKIN)[:, None]


def _detail_basis(rest: RestInfo, age: float) -> np.ndarray:
    """(C, N_face, 3) wrinkle patterns along the inward normal; depth grows with age."""
    ids = rest.face_ids
    v, n, lm = rest.vertices[ids], rest.normals[ids], rest.landmarks
    depth = 2.5 * (0.3 + 1.7 * age)   # deepest (age 1): ~3-5 mm folds, ~1.5-2 mm lines
    brow_y = lm[17:27, 1].mean()
    pats = []
    # Forehead: horizontal ridges between the brows and the hairline.
    band = smoothstep(brow_y + 0.006, brow_y + 0.014, v[:, 1]) * smoothstep(brow_y + 0.05, brow_y + 0.03, v[:, 1])
    pats.append(0.0006 * band * np.sin(2 * np.pi * (v[:, 1] - brow_y) / 0.008)
                * smoothstep(0.06, 0.03, np.abs(v[:, 0])))
    # Nasolabial fold: a groove from the nose wing to the mouth corner.
    fold = np.zeros(len(v))
    for a, b in ((lm[31], lm[48]), (lm[35], lm[54])):
        a = a + np.array([np.sign(a[0]) * 0.006, 0, 0])
        b = b + np.array([np.sign(b[0]) * 0.006, 0, 0])
        ab = b - a
        t = np.clip(((v - a) @ ab) / (ab @ ab), 0, 1)
        dist = np.linalg.norm(v - (a + t[:, None] * ab), axis=1)
        fold += np.exp(-0.5 * (dist / 0.0025) ** 2)
    pats.append(-0.0009 * fold)
    # Crow's feet: radial ripples at the outer eye corners.
    feet = np.zeros(len(v))
    for corner in lm[[36, 45]]:
        r = np.linalg.norm((v - corner)[:, :2], axis=1)
        ang = np.arctan2(v[:, 1] - corner[1], np.abs(v[:, 0] - corner[0]))
        feet += smoothstep(0.004, 0.008, r) * smoothstep(0.02, 0.012, r) * np.sin(7 * ang) * \
            (np.abs(v[:, 0]) > np.abs(corner[0]))
    pats.append(-0.0004 * feet)
    # Chin dimpling: bumps on the chin.
    chin = lm[8] + np.array([0, 0.012, 0.0])
    dimples = sum(np.sin(2 * np.pi * (v[:, k] - chin[k]) / 0.006) for k in (0, 1))
    pats.append(0.0003 * dimples * gaussian(v, chin, (0.012, 0.008, 0.03)))
    # Frown lines: two vertical grooves between the brows.
    frown = sum(np.exp(-0.5 * ((v[:, 0] - sx * 0.006) / 0.0015) ** 2) for sx in (-1, 1))
    frown = (frown * smoothstep(brow_y - 0.012, brow_y - 0.002, v[:, 1])
             * smoothstep(brow_y + 0.02, brow_y + 0.008, v[:, 1]))
    pats.append(-0.0007 * frown)
    basis = np.stack([depth * p[:, None] * n for p in pats])
    return basis


def _albedo(rest: RestInfo, rng: np.random.Generator, skin: np.ndarray, hair: np.ndarray,
            hair_mask: np.ndarray) -> np.ndarray:
    v, lm, part = rest.vertices, rest.landmarks, rest.part
    col = np.tile(skin, (len(v), 1))
    # Low-frequency blotches and fine pores: texture that trackers can latch on to.
    col *= 1.0 + 0.06 * np.sin(v @ rng.normal(size=(3, 1)) * 60)[:, :1]
    col *= 1.0 + 0.04 * rng.normal(size=(len(v), 1))
    # Cheeks a little redder.
    for c in lm[[2, 14]]:
        col[:, 0] += 0.05 * gaussian(v, c + np.array([-np.sign(c[0]) * 0.02, 0.01, 0.02]), (0.015, 0.012, 0.03))
    # Lips.
    lips = np.zeros(len(v))
    # Inside the outer lip contour (frontal projection), feathered over ~1 mm.
    from models.head.regions import _distance_to_polygon, _point_in_polygon
    outline = lm[48:60, :2]
    inside = _point_in_polygon(v[:, :2], outline) & (v[:, 2] > lm[48, 2] - 0.01)
    edge = _distance_to_polygon(v[:, :2], outline)
    lips = np.where(inside, 1.0, smoothstep(0.0012, 0.0, edge) * (v[:, 2] > lm[48, 2] - 0.01))
    lip_rgb = skin * np.array([0.95, 0.68, 0.68])
    col = col * (1 - lips[:, None]) + lip_rgb * lips[:, None]
    # Brows.
    brows = np.zeros(len(v))
    for a, b in zip(range(17, 21), range(18, 22)):
        brows = np.maximum(brows, _segment_mask(v, lm[a], lm[b], 0.0028))
    for a, b in zip(range(22, 26), range(23, 27)):
        brows = np.maximum(brows, _segment_mask(v, lm[a], lm[b], 0.0028))
    col = col * (1 - brows[:, None]) + hair * brows[:, None]
    # Hair on the scalp.
    col = col * (1 - hair_mask[:, None]) + (hair * (1 + 0.1 * rng.normal(size=(len(v), 1)))) * hair_mask[:, None]
    # Clothing below the neckline.
    cloth = rng.uniform(0.1, 0.8, 3)
    neckline = 0.005 - 0.035 * np.clip(1 - np.abs(v[:, 0]) / 0.1, 0, 1)
    wear = smoothstep(neckline + 0.003, neckline - 0.003, v[:, 1]) * (part == pm.SKIN)
    col = col * (1 - wear[:, None]) + cloth * wear[:, None]
    # Eyes: sclera, iris, pupil; mouth: dark cavity, teeth near the lips.
    iris_rgb = rng.choice([np.array([0.25, 0.15, 0.08]), np.array([0.2, 0.35, 0.55]),
                           np.array([0.25, 0.4, 0.25]), np.array([0.12, 0.08, 0.05])])
    for side, centre in ((pm.LEFT_EYE, rest.eye_centres[0]), (pm.RIGHT_EYE, rest.eye_centres[1])):
        m = part == side
        d = v[m] - centre
        ang = np.degrees(np.arccos(np.clip(d[:, 2] / np.linalg.norm(d, axis=1), -1, 1)))
        eye = np.where(ang[:, None] < 16, 0.03, np.where(ang[:, None] < 36, iris_rgb, 0.92))
        col[m] = eye * np.ones(3)
    m = part == pm.MOUTH
    lip_z = lm[62, 2]
    depth_behind = lip_z - v[m, 2]
    teeth = (depth_behind > 0.003) & (depth_behind < 0.009)
    col[m] = np.where(teeth[:, None], np.array([0.9, 0.88, 0.82]), np.array([0.35, 0.08, 0.1]))
    return (np.clip(col, 0, 1) * 255).round().astype(np.uint8)


def _segment_mask(v, a, b, width):
    ab = b - a
    t = np.clip(((v - a) @ ab) / (ab @ ab), 0, 1)
    dist = np.linalg.norm(v - (a + t[:, None] * ab), axis=1)
    return smoothstep(width, width * 0.5, dist)


SKIN_TONES = np.array([[0.96, 0.80, 0.69], [0.90, 0.72, 0.58], [0.80, 0.60, 0.46],
                       [0.67, 0.47, 0.34], [0.52, 0.35, 0.24], [0.38, 0.25, 0.17]])
HAIR_COLOURS = np.array([[0.08, 0.06, 0.05], [0.25, 0.16, 0.09], [0.45, 0.30, 0.16],
                         [0.75, 0.6, 0.35], [0.55, 0.55, 0.55], [0.35, 0.12, 0.06]])


def sample_identity(identity_id: str, rest: RestInfo, rng: np.random.Generator) -> Identity:
    """Draw one identity (deterministic given ``rng``)."""
    betas = np.zeros(300)
    betas[:20] = rng.normal(0, 1.0, 20)
    betas[20:60] = rng.normal(0, 0.3, 40)
    age = float(rng.uniform(0, 1))
    hair_thickness = float(rng.choice([0.0, rng.uniform(0.003, 0.014)], p=[0.15, 0.85]))
    hair_mask = _hair_region(rest) if hair_thickness > 0 else np.zeros(len(rest.vertices))
    v, n = rest.vertices, rest.normals
    skin_mask = (rest.part == pm.SKIN)[:, None]
    offsets = hair_thickness * hair_mask[:, None] * n
    offsets += _smooth_noise_field(rng, v, 6, (0.02, 0.05), 0.0015) * hair_mask[:, None]   # hair lumps
    ears = sum(gaussian(v, (sx * 0.077, 0.19, -0.014), (0.012, 0.03, 0.02)) for sx in (-1, 1))
    offsets[:, 0] += rng.uniform(-0.003, 0.004) * np.sign(v[:, 0]) * ears           # ears stick out
    jaw = gaussian(v, (0, 0.11, 0.03), (0.06, 0.025, 0.05)) * (v[:, 1] < 0.15)
    offsets += np.outer(jaw, rng.normal(0, 0.0015, 3))                              # jaw line
    shoulders = smoothstep(0.0, -0.04, v[:, 1])
    offsets += _smooth_noise_field(rng, v, 5, (0.04, 0.08), 0.008,
                                   pool=v[v[:, 1] < -0.02]) * shoulders[:, None]
    offsets += _age_sag(rest, age)
    offsets *= skin_mask
    skin = SKIN_TONES[rng.integers(len(SKIN_TONES))] * rng.uniform(0.95, 1.05, 3)
    hair = HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))]
    albedo = _albedo(rest, rng, skin, hair, hair_mask)
    return Identity(identity_id=identity_id, betas=betas, age=age, static_offsets=offsets,
                    detail_basis=_detail_basis(rest, age), albedo=albedo,
                    hair_thickness=hair_thickness, skin_rgb=skin, hair_rgb=hair)
