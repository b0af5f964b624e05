"""Named sizes of the expression transfer module, in one registry (torchtitan style).

The paper gives no sizes; ``paper`` is our reading of "a vertex-level MLP" at the scale of
its peers (code 128, hidden 256), not a published configuration.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class TransferFlavor:
    code_dim: int                 # per-frame expression code q = K displacement directions per vertex
    encoder_hidden: int
    encoder_layers: int
    temporal_window: int          # 0: q_i sees frame i only; w > 0: frames i-w..i+w
    identity_dim: int             # global code of the target's personal detail
    identity_hidden: int
    vertex_hidden: int            # width of the per-vertex MLP 𝓖
    decoder_layers: int           # hidden layers of 𝓖 beyond the first
    canonical_frequencies: int    # Fourier octaves of the canonical vertex position
    neutral_frequencies: int      # Fourier octaves of the target's neutral vertex position
    vertex_basis: bool = True     # a learned per-vertex basis beside the MLP's, see module.py

    def to_dict(self) -> dict:
        return asdict(self)


FLAVORS: dict[str, TransferFlavor] = {
    "tiny_cpu": TransferFlavor(code_dim=32, encoder_hidden=64, encoder_layers=2, temporal_window=0,
                               identity_dim=16, identity_hidden=32, vertex_hidden=48,
                               decoder_layers=1, canonical_frequencies=8, neutral_frequencies=4),
    "small": TransferFlavor(code_dim=64, encoder_hidden=128, encoder_layers=2, temporal_window=0,
                            identity_dim=32, identity_hidden=64, vertex_hidden=96,
                            decoder_layers=2, canonical_frequencies=8, neutral_frequencies=6),
    "base": TransferFlavor(code_dim=128, encoder_hidden=256, encoder_layers=3, temporal_window=2,
                           identity_dim=64, identity_hidden=128, vertex_hidden=192,
                           decoder_layers=3, canonical_frequencies=10, neutral_frequencies=6),
    "paper": TransferFlavor(code_dim=128, encoder_hidden=256, encoder_layers=4, temporal_window=2,
                            identity_dim=128, identity_hidden=256, vertex_hidden=256,
                            decoder_layers=4, canonical_frequencies=10, neutral_frequencies=8),
}


def flavor(name: str) -> TransferFlavor:
    """The flavor called ``name`` (a clear error listing the known ones)."""
    if name not in FLAVORS:
        raise ValueError(f"unknown transfer flavor {name!r}; known: {sorted(FLAVORS)}")
    return FLAVORS[name]
