"""Mesh topology helpers: barycentric upsampling and the mesh Laplacian."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Upsampling:
    """A finer mesh whose every vertex is a barycentric point of a coarse triangle.

    ``fine = sum_k bary[:, k] * coarse[coarse_faces[face_idx, k]]``; because fine vertices are
    tied to coarse triangles, they follow whatever moves the coarse vertices (blend shapes,
    pose correctives, skinning weights interpolate the same way).
    """

    face_idx: np.ndarray        # (N_s,) coarse triangle of each fine vertex
    bary: np.ndarray            # (N_s, 3) barycentric weights in that triangle
    vertex_ids: np.ndarray      # (N_s, 3) the coarse vertices those weights apply to
    faces: np.ndarray           # (F_s, 3) fine triangles, same winding as the coarse ones
    coarse_to_fine: np.ndarray  # (V,) fine id of each coarse vertex (coarse vertices come first)

    @property
    def num_vertices(self) -> int:
        return len(self.face_idx)

    def reordered(self, order: np.ndarray) -> "Upsampling":
        """The same mesh with fine vertices renumbered: new vertex i is old vertex order[i]."""
        new_of_old = np.empty_like(order)
        new_of_old[order] = np.arange(len(order))
        return Upsampling(face_idx=self.face_idx[order], bary=self.bary[order],
                          vertex_ids=self.vertex_ids[order], faces=new_of_old[self.faces],
                          coarse_to_fine=new_of_old[self.coarse_to_fine])

    def interpolate(self, coarse: np.ndarray) -> np.ndarray:
        """Per-coarse-vertex values (V, ...) to the fine vertices (N_s, ...)."""
        return np.einsum("nk,nk...->n...", self.bary, coarse[self.vertex_ids])


def upsample(faces: np.ndarray, num_vertices: int, levels: int) -> Upsampling:
    """Midpoint-subdivide ``levels`` times (4x faces per level), tracking barycentrics.

    Level 0 is the identity. Vertices not used by any face are not allowed.
    """
    faces = np.asarray(faces, dtype=np.int64)
    if levels < 0:
        raise ValueError(f"subdivision levels must be >= 0, got {levels}")
    used = np.zeros(num_vertices, bool)
    used[faces.ravel()] = True
    if not used.all():
        raise ValueError(f"{(~used).sum()} vertices are not used by any face")
    n_faces = len(faces)
    fine_faces = faces.copy()
    parent = np.arange(n_faces)
    corner_bary = np.broadcast_to(np.eye(3), (n_faces, 3, 3)).copy()   # (F, corner, weight)
    n = num_vertices
    for _ in range(levels):
        edges = np.stack([fine_faces[:, [0, 1]], fine_faces[:, [1, 2]], fine_faces[:, [2, 0]]], 1)
        key = np.sort(edges, axis=2).reshape(-1, 2)
        uniq, inverse = np.unique(key, axis=0, return_inverse=True)
        mid = n + inverse.reshape(-1, 3)                    # (F, 3): ab, bc, ca
        n += len(uniq)
        a, b, c = fine_faces.T
        ab, bc, ca = mid.T
        ba, bb, bcn = corner_bary[:, 0], corner_bary[:, 1], corner_bary[:, 2]
        m_ab, m_bc, m_ca = 0.5 * (ba + bb), 0.5 * (bb + bcn), 0.5 * (bcn + ba)
        fine_faces = np.concatenate([np.stack([a, ab, ca], 1), np.stack([b, bc, ab], 1),
                                     np.stack([c, ca, bc], 1), np.stack([ab, bc, ca], 1)])
        corner_bary = np.concatenate([np.stack([ba, m_ab, m_ca], 1), np.stack([bb, m_bc, m_ab], 1),
                                      np.stack([bcn, m_ca, m_bc], 1), np.stack([m_ab, m_bc, m_ca], 1)])
        parent = np.tile(parent, 4)
    flat_v = fine_faces.ravel()
    first = np.unique(flat_v, return_index=True)[1]         # one (face, corner) per fine vertex
    face_idx = parent[first // 3]
    bary = corner_bary.reshape(-1, 3)[first]
    return Upsampling(face_idx=face_idx, bary=bary, vertex_ids=faces[face_idx],
                      faces=fine_faces, coarse_to_fine=np.arange(num_vertices))


def mesh_edges(faces: np.ndarray) -> np.ndarray:
    """Unique undirected edges (E, 2) of a triangle mesh."""
    e = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1).astype(np.int64)
    n = int(e.max()) + 1 if len(e) else 1
    key = np.unique(e[:, 0] * n + e[:, 1])             # one int per edge: a 1-D sort, not rows
    return np.stack([key // n, key % n], 1)


def uniform_laplacian(faces: np.ndarray, num_vertices: int) -> torch.Tensor:
    """Sparse uniform Laplacian L = A D^-1 - I (rows: mean of neighbours minus the vertex).

    Same convention as ``pytorch3d.ops.laplacian``; built here so the head model does not
    need pytorch3d (an optional, GPU-oriented dependency).
    """
    e = torch.as_tensor(mesh_edges(faces))
    rows = torch.cat([e[:, 0], e[:, 1]])
    cols = torch.cat([e[:, 1], e[:, 0]])
    deg = torch.bincount(rows, minlength=num_vertices).clamp(min=1).float()
    vals = 1.0 / deg[rows]
    diag = torch.arange(num_vertices)
    idx = torch.cat([torch.stack([rows, cols]), torch.stack([diag, diag])], 1)
    vals = torch.cat([vals, -torch.ones(num_vertices)])
    return torch.sparse_coo_tensor(idx, vals, (num_vertices, num_vertices)).coalesce()
