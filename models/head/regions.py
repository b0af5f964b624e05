"""Region definitions on an SMPL-X-topology mesh: head-and-torso sub-mesh, face region.

Both rules work from what every SMPL-X file holds (skinning weights, the landmark embedding),
so the same code serves the real model and the synthetic one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .smplx_file import JOINT

# Joints whose skinned vertices form the head-and-torso region (head, neck, upper chest,
# collars); arms, hands and legs are left out.
HEAD_TORSO_JOINTS = (JOINT["spine3"], JOINT["neck"], JOINT["left_collar"], JOINT["right_collar"],
                     JOINT["head"], JOINT["jaw"], JOINT["left_eye"], JOINT["right_eye"])
EYE_JOINTS = (JOINT["left_eye"], JOINT["right_eye"])


@dataclass(frozen=True)
class SubMesh:
    vertex_ids: np.ndarray   # (V_sub,) ids into the full mesh, ascending
    faces: np.ndarray        # (F_sub, 3) indexing the sub-mesh vertices
    face_ids: np.ndarray     # (F_sub,) ids of these faces in the full mesh


def select_submesh(weights: np.ndarray, faces: np.ndarray,
                   joints: tuple[int, ...] = HEAD_TORSO_JOINTS, threshold: float = 0.5) -> SubMesh:
    """Faces whose three vertices carry at least ``threshold`` skinning weight on ``joints``."""
    keep_vertex = weights[:, list(joints)].sum(1) >= threshold
    face_keep = keep_vertex[faces].all(1)
    face_ids = np.nonzero(face_keep)[0]
    used = np.unique(faces[face_ids])
    remap = np.full(len(weights), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return SubMesh(vertex_ids=used, faces=remap[faces[face_ids]], face_ids=face_ids)


def _point_in_polygon(points: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule for 2D points (N, 2) against a closed polygon (M, 2)."""
    x, y = points[:, :1], points[:, 1:]
    x0, y0 = poly[None, :, 0], poly[None, :, 1]
    x1, y1 = np.roll(poly[:, 0], -1)[None], np.roll(poly[:, 1], -1)[None]
    crosses = ((y0 > y) != (y1 > y)) & (x < (x1 - x0) * (y - y0) / np.where(y1 == y0, 1e-12, y1 - y0) + x0)
    return crosses.sum(1) % 2 == 1


def _distance_to_polygon(points: np.ndarray, poly: np.ndarray) -> np.ndarray:
    a, b = poly, np.roll(poly, -1, 0)
    ab = b - a
    t = np.clip(np.einsum("nmk,mk->nm", points[:, None] - a[None], ab) / (ab ** 2).sum(1), 0, 1)
    closest = a[None] + t[..., None] * ab[None]
    return np.linalg.norm(points[:, None] - closest, axis=-1).min(1)


def face_outline(landmarks: np.ndarray, forehead: float = 1.8) -> np.ndarray:
    """Frontal (x, y) outline of the face: jaw contour (iBUG 0..16) closed over the forehead.

    The forehead edge is the brows raised by ``forehead`` times the brow-to-eye height.
    """
    lm = landmarks
    rise = forehead * (lm[17:27, 1].mean() - lm[36:48, 1].mean())
    brows = lm[[26, 25, 24, 23, 22, 21, 20, 19, 18, 17], :2] + np.array([0.0, rise])
    return np.concatenate([lm[0:17, :2], brows])


def face_region(vertices: np.ndarray, landmarks: np.ndarray, weights: np.ndarray,
                falloff: float = 0.012) -> tuple[np.ndarray, np.ndarray]:
    """Face-region mask and a soft weight (1 inside, fading to 0 at the outline).

    In the rest pose: inside the frontal face outline, in front of the jaw-contour ends (which
    drops ears and the back of the head), and not an eyeball.
    """
    outline = face_outline(landmarks)
    inside = _point_in_polygon(vertices[:, :2], outline)
    front = vertices[:, 2] > min(landmarks[0, 2], landmarks[16, 2]) - 0.005
    not_eye = weights[:, list(EYE_JOINTS)].sum(1) < 0.5
    mask = inside & front & not_eye
    dist = _distance_to_polygon(vertices[:, :2], outline)
    soft = np.where(mask, smoothstep(0.0, falloff, dist), 0.0)
    return mask, soft


def smoothstep(e0: float, e1: float, x) -> np.ndarray:
    """Hermite step from 0 at e0 to 1 at e1 (e1 < e0 gives a falling step)."""
    t = np.clip((np.asarray(x) - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)
