"""The latent codec: diffusers' ``AutoencoderKLWan``, at every scale (one code path).

Real runs load the Wan2.1 VAE from a local diffusers folder (``LatentCodec.from_pretrained``,
the ``vae/`` subfolder of a Wan Diffusers checkpoint): z 16, 4x in time (first frame alone),
8x in space, latents normalised with the config's ``latents_mean`` / ``latents_std``.

At ``tiny_cpu`` scale no Wan weights exist here, so the codec is a *tiny* ``AutoencoderKLWan``
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
from torch import Tensor, nn

from .flavors import LATENT_CHANNELS, check_video_shape

TINY_VAE = dict(base_dim=16, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                temperal_downsample=[False, True, True],
                latents_mean=[0.0] * LATENT_CHANNELS, latents_std=[1.0] * LATENT_CHANNELS)


class LatentCodec(nn.Module):
    """Videos in [-1, 1] (B, 3, F=4k+1, H, W) <-> normalised latents (B, 16, k+1, H/8, W/8)."""

    def __init__(self, vae: AutoencoderKLWan) -> None:
        super().__init__()
        self.vae = vae

    @classmethod
    def tiny(cls, seed: int | None = 0, **overrides) -> "LatentCodec":
        """The tiny Wan VAE of ``tiny_cpu`` (random weights unless trained; see the module doc).
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
        path = Path(folder) / subfolder if subfolder else Path(folder)
        check_weights_folder(path, AutoencoderKLWan)
        return cls(AutoencoderKLWan.from_pretrained(path, torch_dtype=dtype))

    def save_pretrained(self, folder: str | Path) -> None:
        self.vae.save_pretrained(folder)

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        shape = (1, LATENT_CHANNELS, 1, 1, 1)
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
