"""The latent codec: diffusers' ``AutoencoderKLWan``, at every scale (one code path).

Real runs load the Wan2.1 VAE from a local diffusers folder (``LatentCodec.from_pretrained``,
the ``vae/`` subfolder of a Wan Diffusers checkpoint): z 16, 4x in time (first frame alone),
8x in space, latents normalised with the config's ``latents_mean`` / ``latents_std``.

At ``tiny_z16`` scale no Wan weights exist here, so the codec is a *tiny* ``AutoencoderKLWan``
(``TINY_VAE``: base_dim 16, dim_mult [1, 2, 2, 2], one res block, the same 4x/8x compression
and z 16 as the real one, ~1 M parameters instead of 127 M). Built with random weights it is
only a fixed random encoder (enough for shape tests); for anything judged on pixels it must be
trained on the corpus first (``vae_loss`` is the objective), its latent statistics set with
``set_latent_stats``, then frozen and saved like the real one. Same class, same calls, same
normalisation: only the weights and the config differ.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, IdentityDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from .flavors import LATENT_CHANNELS, VAE_SPACE, VAE_TIME, check_video_shape

TINY_VAE = dict(base_dim=16, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                temperal_downsample=[False, True, True],
                latents_mean=[0.0] * LATENT_CHANNELS, latents_std=[1.0] * LATENT_CHANNELS)


class SpaceToDepthVAE(ModelMixin, ConfigMixin):
    """A fixed, exactly invertible codec with the Wan VAE's interface and temporal layout.

    Frame 0 alone, then groups of ``temporal`` frames, give k+1 latent frames for 4k+1 frames
    (as the Wan VAE); each latent pixel holds the ``spatial`` x ``spatial`` x ``temporal`` block
    of RGB values it covers (frame 0 repeated into all ``temporal`` slots; decoding averages
    them), so z = 3 * spatial² * temporal channels at 1/``spatial`` of the resolution. No
    parameters are learned: ``basis`` is an orthonormal channel basis (identity), stored so the
    folder holds a weights file like any diffusers model. ``encode`` / ``decode`` return
    diffusers' output types, so :class:`LatentCodec` drives it exactly as the Wan VAE.

    Why at ``tiny_z16`` scale: a tiny VAE trained here for minutes caps PSNR below copying the
    reference on held-out identities, and its /8 grid leaves a 32² video 2x2 tokens a frame;
    this codec is lossless and, at /2, gives 8x8 tokens a frame at 32²."""

    @register_to_config
    def __init__(self, in_channels: int = 3, spatial: int = 2, temporal: int = VAE_TIME,
                 latents_mean: list[float] | None = None, latents_std: list[float] | None = None) -> None:
        super().__init__()
        z = in_channels * spatial * spatial * temporal
        if latents_mean is None or latents_std is None:
            self.register_to_config(latents_mean=[0.0] * z, latents_std=[1.0] * z)
        self.register_buffer("basis", torch.eye(z))

    @property
    def z_dim(self) -> int:
        return self.basis.shape[0]

    def encode(self, x: Tensor, return_dict: bool = True) -> AutoencoderKLOutput:
        """(B, C, 4k+1, H, W) -> latent_dist over (B, z, k+1, H/s, W/s) (a point mass)."""
        b, c, f, h, w = x.shape
        t, s = self.config.temporal, self.config.spatial
        x = torch.cat([x[:, :, :1].expand(-1, -1, t - 1, -1, -1), x], 2)           # frame 0 fills its group
        x = x.reshape(b, c, (f + t - 1) // t, t, h // s, s, w // s, s)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, self.z_dim, (f + t - 1) // t, h // s, w // s)
        z = torch.einsum("ij,bjthw->bithw", self.basis.to(x.dtype), x)
        return AutoencoderKLOutput(latent_dist=IdentityDistribution(z))

    def decode(self, z: Tensor, return_dict: bool = True) -> DecoderOutput:
        """Exact inverse of ``encode`` (frame 0: the mean of its group's slots)."""
        b, _, n, h, w = z.shape
        t, s, c = self.config.temporal, self.config.spatial, self.config.in_channels
        x = torch.einsum("ji,bjthw->bithw", self.basis.to(z.dtype), z)
        x = x.reshape(b, c, t, s, s, n, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, c, n * t, h * s, w * s)
        first = x[:, :, :t].mean(2, keepdim=True)
        return DecoderOutput(sample=torch.cat([first, x[:, :, t:]], 2))


CODEC_CLASSES = {"AutoencoderKLWan": AutoencoderKLWan, "SpaceToDepthVAE": SpaceToDepthVAE}


def codec_layout(folder: str | Path, subfolder: str | None = None) -> tuple[int, int]:
    """(latent channels, spatial factor) of a codec folder, from its config alone."""
    import json
    path = Path(folder) / subfolder if subfolder else Path(folder)
    config = json.loads((path / "config.json").read_text())
    if config.get("_class_name") == "SpaceToDepthVAE":
        c, s, t = config.get("in_channels", 3), config.get("spatial", 2), config.get("temporal", VAE_TIME)
        return c * s * s * t, s
    return int(config.get("z_dim", LATENT_CHANNELS)), VAE_SPACE


class LatentCodec(nn.Module):
    """Videos in [-1, 1] (B, 3, F=4k+1, H, W) <-> normalised latents (B, z, k+1, H/s, W/s):
    z 16, s 8 for the Wan VAE; ``SpaceToDepthVAE``: z 48, s 2 (lossless)."""

    def __init__(self, vae: AutoencoderKLWan | SpaceToDepthVAE) -> None:
        super().__init__()
        self.vae = vae

    @property
    def latent_channels(self) -> int:
        return int(self.vae.z_dim) if isinstance(self.vae, SpaceToDepthVAE) else int(self.vae.config.z_dim)

    @property
    def spatial_factor(self) -> int:
        return int(self.vae.config.spatial) if isinstance(self.vae, SpaceToDepthVAE) else VAE_SPACE

    @classmethod
    def space_to_depth(cls, spatial: int = 2) -> "LatentCodec":
        """The lossless fixed codec (``SpaceToDepthVAE``); set its latent statistics before use."""
        return cls(SpaceToDepthVAE(spatial=spatial))

    @classmethod
    def tiny(cls, seed: int | None = 0, **overrides) -> "LatentCodec":
        """The tiny Wan VAE of ``tiny_z16`` (random weights unless trained; see the module doc).
        ``overrides``: ``AutoencoderKLWan`` arguments, e.g. ``base_dim=8`` for a cheaper one."""
        if seed is not None:
            torch.manual_seed(seed)
        return cls(AutoencoderKLWan(**{**TINY_VAE, **overrides}))

    @classmethod
    def from_pretrained(cls, folder: str | Path, subfolder: str | None = None,
                        dtype: torch.dtype = torch.float32) -> "LatentCodec":
        """Load a Wan VAE from a local diffusers folder (``folder/subfolder`` holds config.json
        + diffusion_pytorch_model.safetensors); errors name the folder and the problem."""
        from .weights import check_weights_folder
        import json
        path = Path(folder) / subfolder if subfolder else Path(folder)
        kind = AutoencoderKLWan
        if (path / "config.json").is_file():
            try:
                kind = CODEC_CLASSES.get(json.loads((path / "config.json").read_text()).get("_class_name"),
                                         AutoencoderKLWan)
            except json.JSONDecodeError:
                pass                                  # check_weights_folder names the problem
        check_weights_folder(path, kind)
        return cls(kind.from_pretrained(path, torch_dtype=dtype))

    def save_pretrained(self, folder: str | Path) -> None:
        self.vae.save_pretrained(folder)

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        shape = (1, self.latent_channels, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean, device=like.device, dtype=torch.float32).view(shape)
        std = torch.tensor(self.vae.config.latents_std, device=like.device, dtype=torch.float32).view(shape)
        return mean, std

    def set_latent_stats(self, mean: Tensor, std: Tensor) -> None:
        """Store per-channel latent statistics in the config (saved with the weights)."""
        self.vae.register_to_config(latents_mean=[float(v) for v in mean], latents_std=[float(v) for v in std])

    def encode(self, video: Tensor, sample: bool = False) -> Tensor:
        """Normalised latents (fp32) of a video in [-1, 1]; the posterior mean unless ``sample``."""
        check_video_shape(video.shape[2], video.shape[3], video.shape[4])
        dist = self.vae.encode(video.to(self.vae.dtype)).latent_dist
        z = (dist.sample() if sample else dist.mode()).float()
        mean, std = self._stats(z)
        return (z - mean) / std

    def decode(self, latents: Tensor) -> Tensor:
        """Video in [-1, 1] (fp32) from normalised latents."""
        mean, std = self._stats(latents)
        z = latents.float() * std + mean
        return self.vae.decode(z.to(self.vae.dtype)).sample.float()

    def encode_reference(self, image: Tensor, frames: int) -> Tensor:
        """Wan I2V's reference latent: the video [image, 0, 0, ...] of ``frames`` frames, encoded."""
        b, c, h, w = image.shape
        check_video_shape(frames, h, w)
        video = torch.cat([image[:, :, None], image.new_zeros(b, c, frames - 1, h, w)], 2)
        return self.encode(video)


def vae_loss(vae: AutoencoderKLWan, video: Tensor, kl_weight: float = 1e-4,
             sample: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """Objective to train the tiny codec on the corpus (fp32): L1 + MSE reconstruction of a
    sampled latent (``sample=False``: of the posterior mean, what ``LatentCodec.encode``
    gives) + ``kl_weight`` x the KL to N(0, 1), each a mean per element."""
    dist = vae.encode(video).latent_dist
    recon = vae.decode(dist.sample() if sample else dist.mode()).sample.float()
    l1 = (recon - video.float()).abs().mean()
    mse = ((recon - video.float()) ** 2).mean()
    kl = 0.5 * (dist.mean.float() ** 2 + dist.var.float() - 1.0 - dist.logvar.float()).mean()
    loss = l1 + mse + kl_weight * kl
    return loss, {"l1": l1.detach(), "mse": mse.detach(), "kl": kl.detach()}


def to_unit_video(frames: Tensor) -> Tensor:
    """Reader layout (B, T, H, W, 3) uint8 -> model layout (B, 3, T, H, W) float32 in [-1, 1]."""
    return frames.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


def to_pixels(video: Tensor) -> Tensor:
    """Model layout (B, 3, T, H, W) in [-1, 1] -> (B, T, H, W, 3) uint8."""
    return video.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)
