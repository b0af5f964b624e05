"""Named architectures of the generator, in one registry (torchtitan style). A flavor is the
architecture only (widths, depth, latent layout it takes, adapters), never hardware or a
training recipe (those are in ``configs/recipes/``):

- ``tiny_z16``: 4 heads x 16, 2 layers, on a 16-channel /8 latent (the Wan VAE's layout; the
  tiny trained Wan VAE of ``codec --kind wan_vae``); what the shape tests use;
- ``tiny_z48``: 4 heads x 64, 3 layers, on a 48-channel /2 latent (the lossless
  ``SpaceToDepthVAE`` at /2), the reference latent repeated and subtracted (residual); the
  ``tiny_cpu`` recipe's;
- ``wan1.3b``, ``wan14b``: the Wan2.1 transformers; ``wan14b_lora``: wan14b with rank-128 LoRA.

The transformer shapes of ``wan1.3b`` / ``wan14b`` are the official Wan2.1 ones (head_dim 128,
patch (1, 2, 2); 1.3B: 12 heads, ffn 8960, 30 layers; 14B: 40 heads, ffn 13824, 40 layers),
with the image-to-video input (in 36 = 16 noisy + 4 mask + 16 reference latent). Wan2.1
publishes no I2V-1.3B: ``wan1.3b`` starts from the T2V-1.3B weights with the patch embedding
widened from 16 to 36 input channels (the extra channels zero-initialised; see
``model.widen_patch_embedding``). CLIP (``image_dim`` 1280, ``added_kv_proj_dim`` = dim) is
off by default and only on with ``clip=True``; Wan's attention processor then needs exactly
512 context tokens.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

LATENT_CHANNELS = 16          # Wan VAE z_dim
MASK_CHANNELS = 4             # I2V mask: one channel per frame of a 4-frame latent group
VAE_TIME, VAE_SPACE = 4, 8    # Wan VAE: 4x in time (first frame alone), 8x in space
PATCH = (1, 2, 2)             # Wan patch embedding (t, h, w)
SPACE_MULTIPLE = VAE_SPACE * PATCH[1]   # 16: one token per 16x16 pixels


@dataclass(frozen=True)
class GeneratorFlavor:
    num_heads: int
    head_dim: int
    ffn_dim: int
    num_layers: int
    text_dim: int = 4096            # umT5-XXL width (what Wan's text embedder takes)
    freq_dim: int = 256
    context_tokens: int = 512       # learned context: tokens x text_dim (Wan: 512 text tokens)
    clip: bool = False              # CLIP image embedding path (image_dim 1280, added k/v)
    normal_width: int = 16          # hidden channels of the normal encoders (UniAnimate-DiT: 16)
    latent_channels: int = LATENT_CHANNELS   # the codec's z (SpaceToDepthVAE at /2: 48)
    latent_space: int = VAE_SPACE   # the codec's spatial factor (SpaceToDepthVAE: 2)
    reference_repeat: bool = False  # True: the reference latent's frame 0 in every latent frame of the I2V
                                    # condition (Wan: frame 0 only, zeros after); the mask still marks frame 0
    reference_residual: bool = False  # True: flow matching on latents minus the reference latent's frame 0
                                      # (in every latent frame): noise-free, the model starts at "copy"
    lora_rank: int = 0              # 0: full fine-tune; > 0: LoRA (peft) on q/k/v/o/ffn
    lora_alpha: int = 0             # 0: = rank
    rope_max_seq_len: int = 1024

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def in_channels(self) -> int:
        return 2 * self.latent_channels + MASK_CHANNELS   # 36 with the Wan VAE

    def transformer_config(self) -> dict:
        """Keyword arguments of diffusers' ``WanTransformer3DModel``."""
        return dict(patch_size=PATCH, num_attention_heads=self.num_heads, attention_head_dim=self.head_dim,
                    in_channels=self.in_channels, out_channels=self.latent_channels, text_dim=self.text_dim,
                    freq_dim=self.freq_dim, ffn_dim=self.ffn_dim, num_layers=self.num_layers,
                    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                    image_dim=1280 if self.clip else None, added_kv_proj_dim=self.dim if self.clip else None,
                    rope_max_seq_len=self.rope_max_seq_len)

    def to_dict(self) -> dict:
        return asdict(self)

    def __post_init__(self) -> None:
        out = self.latent_channels * PATCH[0] * PATCH[1] * PATCH[2]
        if self.dim < out:
            raise ValueError(f"dim {self.dim} (num_heads x head_dim) is below the {out} values each token outputs "
                             f"(latent_channels {self.latent_channels} x patch {PATCH}): the transformer could not "
                             f"represent the noise it must remove, and samples keep it; widen the flavor")
        if self.clip and self.context_tokens != 512:
            raise ValueError(f"clip=True needs context_tokens=512 (Wan's attention processor splits the image "
                             f"tokens off by assuming 512 text tokens), got {self.context_tokens}")


FLAVORS: dict[str, GeneratorFlavor] = {
    "tiny_z16": GeneratorFlavor(num_heads=4, head_dim=16, ffn_dim=128, num_layers=2, text_dim=32, freq_dim=32,
                                context_tokens=8, normal_width=8, rope_max_seq_len=64),
    # z 48 at /2: 8x8 tokens a frame at 32²; dim 256 > the 192 values a token outputs (48 x 2 x 2;
    # a narrower model cannot represent the noise it must remove, see __post_init__)
    "tiny_z48": GeneratorFlavor(num_heads=4, head_dim=64, ffn_dim=512, num_layers=3, text_dim=32, freq_dim=32,
                                context_tokens=8, normal_width=16, latent_channels=48,
                                latent_space=2, reference_repeat=True, reference_residual=True,
                                rope_max_seq_len=64),
    "wan1.3b": GeneratorFlavor(num_heads=12, head_dim=128, ffn_dim=8960, num_layers=30),
    "wan14b": GeneratorFlavor(num_heads=40, head_dim=128, ffn_dim=13824, num_layers=40),
    "wan14b_lora": GeneratorFlavor(num_heads=40, head_dim=128, ffn_dim=13824, num_layers=40,
                                   lora_rank=128, lora_alpha=128),
}


def flavor(name: str, **overrides) -> GeneratorFlavor:
    """The flavor called ``name``, with optional field overrides (e.g. ``clip=True``)."""
    if name not in FLAVORS:
        raise ValueError(f"unknown generator flavor {name!r}; known: {sorted(FLAVORS)}")
    return replace(FLAVORS[name], **overrides) if overrides else FLAVORS[name]


def check_video_shape(frames: int, height: int, width: int) -> None:
    """Frame counts 4k+1 (the Wan VAE codes the first frame alone, then groups of 4) and sides
    that are multiples of 16 (VAE /8 x patch /2); a ValueError naming the value and the rule."""
    if frames < 1 or (frames - 1) % VAE_TIME != 0:
        raise ValueError(f"frame count {frames} is not of the form 4k+1 (1, 5, 9, ..., 81): the Wan VAE codes "
                         f"the first frame alone and then groups of {VAE_TIME}")
    for name, side in (("height", height), ("width", width)):
        if side < SPACE_MULTIPLE or side % SPACE_MULTIPLE != 0:
            raise ValueError(f"{name} {side} is not a positive multiple of {SPACE_MULTIPLE} "
                             f"(VAE /{VAE_SPACE} x patch /{PATCH[1]})")


def latent_shape(frames: int, height: int, width: int, space: int = VAE_SPACE) -> tuple[int, int, int]:
    """(latent frames, latent height, latent width) of a checked video shape (``space``: the
    codec's spatial factor)."""
    check_video_shape(frames, height, width)
    return (frames - 1) // VAE_TIME + 1, height // space, width // space


def token_grid(frames: int, height: int, width: int, space: int = VAE_SPACE) -> tuple[int, int, int]:
    """The transformer's patch-token grid (t, h, w) for a video of this shape."""
    t, h, w = latent_shape(frames, height, width, space)
    return t // PATCH[0], h // PATCH[1], w // PATCH[2]
