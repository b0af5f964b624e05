"""The expression transfer module: (ψ, jaw) of a driver + the target's neutral mesh -> Δf.

    q_i   = 𝓔(ψ_i, jaw_i)                               per-frame expression code (K)
    z     = 𝓘(Δg on the face region)                     global code of the target's detail
    W_v   = MLP(γ(canonical_v), γ(V_neutral,v), Δg_v, z) + D_v      K displacement directions
    Δf_iv = W_v · [(q_i − q_0) ⊙ (1 + A z)]                          per vertex v, frame i

- 𝓔 is an MLP per frame over (ψ, ``jaw_scale`` · jaw): the jaw angle (~0.1 rad) is brought to
  the scale of ψ, so its weights need not grow tenfold before the chin moves. With
  ``temporal_window`` w > 0 a 1-D convolution over frames i-w..i+w follows (replicate
  padding, zero-initialised). The shipped small flavors use w = 0: in the head model Δf(i)
  is a per-frame quantity fitted against frame i alone (temporal smoothness is the fitter's
  job), so a per-frame code cannot leak clip-level information and can stream; larger
  flavors may look at neighbours for effects that lag.
- 𝓖 is a vertex-level MLP, batched over frames and vertices: per vertex it sees Fourier
  features γ of the vertex's canonical position (a fixed per-vertex coordinate of the
  template, like a UV coordinate: where a wrinkle sits is defined on the face, not in metres)
  and of the target's neutral position V_neutral = B(V(β)) + Δg, the vertex's Δg and the
  identity code z, and emits K displacement directions W_v (3 × K), plus a learned
  per-vertex basis D_v (``vertex_basis``: localized detail such as a fold a vertex or two
  wide is learned directly instead of through high Fourier frequencies). 𝓖 is linear in the
  code: the nonlinearity in (ψ, jaw) lives in 𝓔, the cost per (frame, vertex) is 3K
  multiply-adds, and the bases are computed once per target for any number of frames.
- 𝓘 is a PointNet over the face region (canonical position + Δg per vertex, mean- and
  max-pooled); its code shapes the bases and scales the expression code per identity
  (1 + A z, A zero-initialised): how deep an identity's wrinkles run (in the synthetic world
  age shows in Δg) is not visible from a single vertex.
- Subtracting the neutral frame's code makes Δf exactly zero at a neutral face (ψ = 0,
  jaw = 0): the static field owns the rest shape. Fitted Δf is zero-mean over a clip, so
  training compares frame-centred Δf and this anchor fixes the level.
- Face region only: the output is (…, N_face, 3) on the head model's ``face_vertex_ids``;
  ``PersonalizedHead`` adds it there and nowhere else.

Save and load with ``save_pretrained`` / ``from_pretrained`` (safetensors + config.json).
"""
from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from .flavors import flavor as get_flavor


def fourier_features(x: Tensor, octaves: int) -> Tensor:
    """[x, sin(2^k π x), cos(2^k π x)] for k < octaves, over the last axis: (..., d(1 + 2k))."""
    if octaves == 0:
        return x
    freqs = (2.0 ** torch.arange(octaves, device=x.device, dtype=x.dtype)) * math.pi
    ang = (x[..., None] * freqs).flatten(-2)
    return torch.cat([x, ang.sin(), ang.cos()], -1)


def mlp(dims: list[int], act: type[nn.Module] = nn.SiLU, last_act: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if k < len(dims) - 2 or last_act:
            layers.append(act())
    return nn.Sequential(*layers)


class ExpressionEncoder(nn.Module):
    """𝓔: (ψ (B, T, E), jaw (B, T, 3)) -> q (B, T, D)."""

    def __init__(self, num_expression: int, hidden: int, layers: int, code_dim: int,
                 temporal_window: int) -> None:
        super().__init__()
        self.net = mlp([num_expression + 3] + [hidden] * layers + [code_dim])
        self.temporal_window = temporal_window
        if temporal_window > 0:
            self.temporal = nn.Conv1d(code_dim, code_dim, 2 * temporal_window + 1)
            nn.init.zeros_(self.temporal.weight)
            nn.init.zeros_(self.temporal.bias)

    def forward(self, expression: Tensor, jaw_pose: Tensor) -> Tensor:
        q = self.net(torch.cat([expression, jaw_pose], -1))
        if self.temporal_window > 0:
            b, t, d = q.shape
            x = nn.functional.pad(q.transpose(1, 2), (self.temporal_window,) * 2, mode="replicate")
            q = q + self.temporal(x).transpose(1, 2)
        return q


class ExpressionTransfer(ModelMixin, ConfigMixin):
    """Predicts the target's Δf (B, T, N_face, 3) from a driver's (ψ, jaw) (see the module
    docstring). ``canonical_vertices`` (N_face, 3), the template's neutral face region, is a
    buffer set once from the head model (:meth:`set_canonical`) and saved with the weights."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, num_face_vertices: int, flavor: str = "tiny_cpu", num_expression: int = 100,
                 position_scale: float = 10.0, offset_scale: float = 2000.0,
                 output_scale: float = 1e-3, jaw_scale: float = 1.0) -> None:
        super().__init__()
        f = get_flavor(flavor)
        self.encoder = ExpressionEncoder(num_expression, f.encoder_hidden, f.encoder_layers,
                                         f.code_dim, f.temporal_window)
        canon_dim = 3 * (1 + 2 * f.canonical_frequencies)
        neutral_dim = 3 * (1 + 2 * f.neutral_frequencies)
        self.identity_point = mlp([canon_dim + 3, f.identity_hidden, f.identity_hidden], last_act=True)
        self.identity_head = nn.Linear(2 * f.identity_hidden, f.identity_dim)
        h = f.vertex_hidden
        in_dim = canon_dim + neutral_dim + 3 + f.identity_dim
        self.vertex_net = mlp([in_dim] + [h] * (f.decoder_layers + 1) + [3 * f.code_dim])
        self.vertex_basis = (nn.Parameter(torch.zeros(num_face_vertices, 3 * f.code_dim))
                             if f.vertex_basis else None)
        self.identity_gain = nn.Linear(f.identity_dim, f.code_dim)
        nn.init.zeros_(self.identity_gain.weight)
        nn.init.zeros_(self.identity_gain.bias)
        self.register_buffer("canonical_vertices", torch.zeros(num_face_vertices, 3))

    # -- setup ----------------------------------------------------------------------------
    @torch.no_grad()
    def set_canonical(self, canonical_vertices: Tensor) -> None:
        """The template's neutral face-region vertices (N_face, 3), metres."""
        self.canonical_vertices.copy_(canonical_vertices.to(self.canonical_vertices))

    def _normalised(self, x: Tensor) -> Tensor:
        centre = self.canonical_vertices.mean(0)
        return (x - centre) * self.config.position_scale

    # -- parts ----------------------------------------------------------------------------
    def identity_code(self, static_offsets: Tensor) -> Tensor:
        """𝓘: Δg on the face region (B, N_face, 3) -> z (B, identity_dim)."""
        f = get_flavor(self.config.flavor)
        canon = fourier_features(self._normalised(self.canonical_vertices), f.canonical_frequencies)
        x = torch.cat([canon.expand(static_offsets.shape[0], -1, -1),
                       static_offsets * self.config.offset_scale], -1)
        h = self.identity_point(x)                       # mean: overall shape; max: local detail
        return self.identity_head(torch.cat([h.mean(1), h.amax(1)], -1))

    def vertex_features(self, neutral: Tensor, static_offsets: Tensor, vertex_ids: Tensor | None = None,
                        z: Tensor | None = None) -> Tensor:
        """Per-identity vertex bases (B, S, 3·K) (S = N_face or ``len(vertex_ids)``): computed
        once per target, reused for any number of frames."""
        f = get_flavor(self.config.flavor)
        z = self.identity_code(static_offsets) if z is None else z
        canon = self.canonical_vertices if vertex_ids is None else self.canonical_vertices[vertex_ids]
        if vertex_ids is not None:
            neutral, static_offsets = neutral[:, vertex_ids], static_offsets[:, vertex_ids]
        b, s = neutral.shape[:2]
        parts = [fourier_features(self._normalised(canon), f.canonical_frequencies).expand(b, -1, -1),
                 fourier_features(self._normalised(neutral), f.neutral_frequencies),
                 static_offsets * self.config.offset_scale,
                 z[:, None].expand(b, s, -1)]
        bases = self.vertex_net(torch.cat(parts, -1))
        if self.vertex_basis is not None:
            bases = bases + (self.vertex_basis if vertex_ids is None else self.vertex_basis[vertex_ids])
        return bases

    def decode(self, vertex_features: Tensor, codes: Tensor) -> Tensor:
        """𝓖's per-(frame, vertex) part: bases (B, S, 3·K) and codes (B, T, K) -> (B, T, S, 3),
        metres. Linear in the code: each vertex carries K displacement directions."""
        b, s, _ = vertex_features.shape
        bases = vertex_features.view(b, s, 3, -1)
        return torch.einsum("bsck,btk->btsc", bases, codes) * self.config.output_scale
    # -- forward --------------------------------------------------------------------------
    def forward(self, expression: Tensor, jaw_pose: Tensor, neutral: Tensor, static_offsets: Tensor,
                vertex_ids: Tensor | None = None) -> Tensor:
        """Δf (B, T, S, 3) in metres.

        ``expression`` (B, T, 100) and ``jaw_pose`` (B, T, 3) of the driver; ``neutral``
        (B, N_face, 3) V_neutral and ``static_offsets`` (B, N_face, 3) Δg of the target, both
        on the face region; ``vertex_ids`` (S,) picks face vertices (training samples a
        subset; default all)."""
        z = self.identity_code(static_offsets)
        bases = self.vertex_features(neutral, static_offsets, vertex_ids, z)
        q = self.encoder(expression, jaw_pose * self.config.jaw_scale)
        q0 = self.encoder(torch.zeros_like(expression[:, :1]), torch.zeros_like(jaw_pose[:, :1]))
        return self.decode(bases, (q - q0) * (1 + self.identity_gain(z))[:, None])

    @property
    def num_face_vertices(self) -> int:
        return int(self.canonical_vertices.shape[0])
