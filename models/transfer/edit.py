"""Parametric edits grounded in the head model: per-region expression intensity, jaw scale.

SMPL-X expression components are global (PCA), so "mouth at 1.5×, brows at 0.5×" has no
coefficient to turn. The edit is defined on the surface and brought back to the expression
space by least squares:

    ψ' = argmin_x ‖E x − M_s E ψ‖² = E⁺ M_s E ψ = P_s ψ

with E (3V × 100) the expression directions of the head's coarse vertices and M_s the
per-vertex scale (a region's intensity on its vertices, 1 elsewhere). Regions come from the
template's landmarks: each expression-moved vertex belongs to the nearest landmark group
(brows 17-26, eyes 36-47, mouth 48-67; the rest, nose and jaw line, keeps scale 1). The same
works for a real SMPL-X file. The jaw is scaled by its rotation angle. Δf follows the edited
(ψ', jaw') through the transfer module.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from models.head.head_model import HeadParams, PersonalizedHead

REGIONS = {"brows": range(17, 27), "eyes": range(36, 48), "mouth": range(48, 68),
           "other": list(range(0, 17)) + list(range(27, 36))}


@dataclass
class EditSpec:
    mouth: float = 1.0
    eyes: float = 1.0
    brows: float = 1.0
    jaw: float = 1.0

    @property
    def is_identity(self) -> bool:
        return self.mouth == self.eyes == self.brows == self.jaw == 1.0


class ExpressionEditor:
    """Region masks and the least-squares projection P_s for a head model."""

    def __init__(self, head: PersonalizedHead) -> None:
        with torch.no_grad():
            lm = head(HeadParams.zeros(1)).landmarks[0]                        # (68, 3)
        ids = head.expr_vertex_ids
        verts = head.v_template[:, ids].T                                       # (V_e, 3) template
        groups = list(REGIONS)
        d = torch.stack([torch.cdist(verts, lm[list(REGIONS[g])]).min(1).values for g in groups], 1)
        self.region = [groups[k] for k in d.argmin(1).tolist()]                # per vertex
        self.region_index = d.argmin(1)
        self.groups = groups
        e = head.exprdirs.view(head.exprdirs.shape[0], 3, -1)                   # (100, 3, V_e)
        self.E = e.permute(2, 1, 0).reshape(-1, e.shape[0]).double()           # (3 V_e, 100)
        self.E_pinv = torch.linalg.pinv(self.E)

    def projection(self, spec: EditSpec) -> Tensor:
        """P_s (100, 100) float32."""
        scale = torch.tensor([getattr(spec, g) if g != "other" else 1.0 for g in self.groups],
                             dtype=torch.float64)[self.region_index]           # (V_e,)
        m = scale.repeat_interleave(3)[:, None]                                 # rows are (v, xyz)
        return (self.E_pinv @ (m * self.E)).float()

    def apply(self, expression: Tensor, jaw_pose: Tensor, spec: EditSpec) -> tuple[Tensor, Tensor]:
        """Edited (ψ', jaw') for (T, 100), (T, 3)."""
        if spec.is_identity:
            return expression, jaw_pose
        p = self.projection(spec).to(expression)
        return expression @ p.T, jaw_pose * spec.jaw

    def region_vertex_counts(self) -> dict[str, int]:
        return {g: int((self.region_index == k).sum()) for k, g in enumerate(self.groups)}
