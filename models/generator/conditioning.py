"""The generator's condition encoders (UniAnimate-DiT style) and the learned context.

- ``DrivingNormalEncoder``: driving normal maps (B, 3, F=4k+1, H, W) -> (B, dim, k+1, H/16, W/16),
  exactly the output grid of Wan's patch embedding, so it is added to the patch tokens. The
  first frame is repeated 3 more times (4k+1 -> 4(k+1) frames), as the Wan VAE codes the first
  frame alone; two stride-2 convs in time give /4, three stride-2 convs in space and a final
  (1, 2, 2) patchify conv give /16.
- ``ReferenceNormalEncoder``: the reference normal map (B, 3, H, W) -> (B, 4 + 16, H/8, W/8),
  added to the image-to-video condition (mask + reference latent) at latent frame 0.
- ``ContextEmbedding``: no text encoder is available here. N learned tokens x text_dim stand in
  for Wan's umT5 prompt embedding (or a precomputed one, e.g. umT5 of a fixed prompt, set with
  ``set_context``).

Both encoders' last layers are zero-initialised: at step 0 the generator is the base model.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from .flavors import LATENT_CHANNELS, MASK_CHANNELS, PATCH, VAE_SPACE, VAE_TIME


def _space_strides(latent_space: int) -> tuple[int, int, int]:
    """Space strides of three downsampling convs for a codec's spatial factor (8: 2, 2, 2)."""
    n = {1: 0, 2: 1, 4: 2, 8: 3}.get(latent_space)
    if n is None:
        raise ValueError(f"latent_space {latent_space} is not 1, 2, 4 or 8")
    return tuple(2 if i < n else 1 for i in range(3))


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class DrivingNormalEncoder(nn.Module):
    """3D-conv encoder of the driving normal video onto the patch-token grid."""

    def __init__(self, dim: int, width: int = 16, in_channels: int = 3, latent_space: int = VAE_SPACE) -> None:
        """``width``: hidden channels (UniAnimate-DiT: 16; at full resolution, so keep it small);
        ``latent_space``: the codec's spatial factor (8, 4, 2 or 1), the space strides of the
        three downsampling convs (Wan VAE: 2, 2, 2)."""
        super().__init__()
        w = width
        sp = _space_strides(latent_space)
        conv = lambda a, b, stride: nn.Conv3d(a, b, 3, stride=stride, padding=1)   # noqa: E731
        self.net = nn.Sequential(
            conv(in_channels, w, 1), nn.SiLU(),
            conv(w, w, 1), nn.SiLU(),
            conv(w, w, (1, sp[0], sp[0])), nn.SiLU(),       # /2 space (Wan VAE)
            conv(w, w, (2, sp[1], sp[1])), nn.SiLU(),       # /2 time, /4 space
            conv(w, w, (2, sp[2], sp[2])), nn.SiLU(),       # /4 time, /8 space (= the latent grid)
        )
        self.proj = _zero(nn.Conv3d(w, dim, PATCH, stride=PATCH))   # patchify: /16 space

    def forward(self, normals: Tensor) -> Tensor:
        first = normals[:, :, :1].expand(-1, -1, VAE_TIME - 1, -1, -1)
        # channels-last: on CPU the backward of a contiguous-layout Conv3d takes a slow path (~4x)
        x = torch.cat([first, normals], 2).contiguous(memory_format=torch.channels_last_3d)
        return self.proj(self.net(x)).contiguous()


class ReferenceNormalEncoder(nn.Module):
    """2D-conv encoder of the reference normal map onto the latent grid, I2V-condition channels."""

    def __init__(self, width: int = 16, in_channels: int = 3, latent_channels: int = LATENT_CHANNELS,
                 latent_space: int = VAE_SPACE) -> None:
        super().__init__()
        w = width
        sp = _space_strides(latent_space)
        conv = lambda a, b, stride: nn.Conv2d(a, b, 3, stride=stride, padding=1)   # noqa: E731
        self.net = nn.Sequential(
            conv(in_channels, w, 1), nn.SiLU(),
            conv(w, w, 1), nn.SiLU(),
            conv(w, w, sp[0]), nn.SiLU(),
            conv(w, w, sp[1]), nn.SiLU(),
        )
        self.proj = _zero(conv(w, MASK_CHANNELS + latent_channels, sp[2]))   # /8 with the Wan VAE

    def forward(self, normal: Tensor) -> Tensor:
        return self.proj(self.net(normal))


class GeneratorConditioning(ModelMixin, ConfigMixin):
    """What the generator adds to Wan: both normal encoders and the context tokens.

    Saved beside the transformer (``conditioning/`` of a generator folder) with diffusers'
    ``save_pretrained`` (config.json + safetensors)."""

    @register_to_config
    def __init__(self, dim: int, text_dim: int, context_tokens: int, normal_width: int = 16,
                 latent_channels: int = LATENT_CHANNELS, latent_space: int = VAE_SPACE) -> None:
        super().__init__()
        self.driving = DrivingNormalEncoder(dim, normal_width, latent_space=latent_space)
        self.reference = ReferenceNormalEncoder(normal_width, latent_channels=latent_channels,
                                                latent_space=latent_space)
        self.context = nn.Parameter(torch.randn(context_tokens, text_dim) * 0.02)

    def set_context(self, context: Tensor, trainable: bool = False) -> None:
        """Replace the learned context by a precomputed one (tokens, text_dim), e.g. umT5 of a prompt."""
        if context.ndim != 2 or context.shape[1] != self.config.text_dim:
            raise ValueError(f"context must be (tokens, {self.config.text_dim}), got {tuple(context.shape)}")
        self.context = nn.Parameter(context.detach().to(self.context.dtype).clone(), requires_grad=trainable)
        self.register_to_config(context_tokens=context.shape[0])

    def load_context(self, path: str | Path, trainable: bool = False) -> None:
        """``set_context`` from a local safetensors file holding one tensor ``context`` (tokens, text_dim),
        e.g. umT5 of a fixed prompt computed elsewhere; errors name the file and the problem."""
        from safetensors.torch import load_file
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"context file {path} does not exist")
        try:
            tensors = load_file(str(path))
        except Exception as err:   # noqa: BLE001 - any unreadable file
            raise ValueError(f"context file {path} is not a readable safetensors file ({err})") from err
        if "context" not in tensors:
            raise ValueError(f"context file {path} holds {sorted(tensors)}, not 'context'")
        try:
            self.set_context(tensors["context"].float(), trainable)
        except ValueError as err:
            raise ValueError(f"context file {path}: {err}") from err

    def context_batch(self, batch_size: int) -> Tensor:
        return self.context.unsqueeze(0).expand(batch_size, -1, -1)
