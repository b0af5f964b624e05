"""The generator: Wan2.1 I2V DiT (diffusers ``WanTransformer3DModel``, unmodified) + normal conditions.

    tokens  = patch_embedding([x_t | mask | ref latent + 𝓔_ref(N^R) at frame 0]) + 𝓔_drive(N^D_{1:F})
    v̂       = Wan blocks(tokens, t, context [, CLIP image tokens])

How the driving tokens get in: a **forward hook on ``transformer.patch_embedding``** that adds
the encoder output (already on the patch-embedding's (B, dim, t, h, w) grid) to its output,
scoped to one call by ``_driving_tokens``. Why a hook and not a subclass: diffusers' ``forward``
(RoPE, timestep embedding, gradient checkpointing of the blocks, context-parallel plan, LoRA
scaling) stays diffusers' own and follows its upgrades; the transformer stays a plain
``WanTransformer3DModel``, so official Wan folders load into it as they are, peft's
``add_adapter`` and diffusers' ``save_pretrained`` apply unchanged, and nothing is forked.
The hook adds one tensor (no I/O, no shape magic); a call without driving normals (the
unconditional pass of guidance) leaves the tokens alone.

Folder layout (``save_pretrained`` / ``from_pretrained``), diffusers' own format per part::

    folder/generator.json      {"flavor": ..., "flavor_config": {...}}
    folder/transformer/        WanTransformer3DModel (config.json + safetensors)
    folder/conditioning/       GeneratorConditioning (normal encoders + context)
    folder/lora/               peft adapter (only with LoRA; base weights in transformer/)
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
import torch.utils.checkpoint
from diffusers import WanTransformer3DModel
from torch import Tensor, nn

from .conditioning import GeneratorConditioning
from .flavors import (LATENT_CHANNELS, MASK_CHANNELS, VAE_SPACE, VAE_TIME, GeneratorFlavor, check_video_shape,
                      flavor as get_flavor)
from .weights import WeightsFolderError, check_weights_folder

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]


def i2v_mask(batch: int, latent_frames: int, height: int, width: int, device=None,
             dtype: torch.dtype = torch.float32) -> Tensor:
    """Wan I2V's mask channels (B, 4, t, h, w): 1 on the 4 slots of latent frame 0 (the given
    reference frame), 0 elsewhere; h, w on the latent grid."""
    mask = torch.zeros(batch, MASK_CHANNELS, latent_frames, height, width, device=device, dtype=dtype)
    mask[:, :, 0] = 1
    return mask


class NormalDrivenWan(nn.Module):
    """Wan2.1 I2V transformer conditioned on driving normals, a reference normal and a reference image."""

    def __init__(self, flavor: GeneratorFlavor | str = "tiny_z16",
                 transformer: WanTransformer3DModel | None = None,
                 conditioning: GeneratorConditioning | None = None, flavor_name: str | None = None) -> None:
        super().__init__()
        self.flavor_name = flavor_name or (flavor if isinstance(flavor, str) else "custom")
        self.flavor = get_flavor(flavor) if isinstance(flavor, str) else flavor
        f = self.flavor
        self.transformer = transformer if transformer is not None else WanTransformer3DModel(**f.transformer_config())
        self.conditioning = conditioning if conditioning is not None else GeneratorConditioning(
            dim=f.dim, text_dim=f.text_dim, context_tokens=f.context_tokens, normal_width=f.normal_width,
            latent_channels=f.latent_channels, latent_space=f.latent_space)
        self._pending: Tensor | None = None
        self.transformer.patch_embedding.register_forward_hook(self._add_driving_tokens)
        if f.lora_rank > 0:
            self.add_lora(f.lora_rank, f.lora_alpha or f.lora_rank)

    # -- the hook -------------------------------------------------------------------------------
    def _add_driving_tokens(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        if self._pending is None:
            return output
        if self._pending.shape != output.shape:
            raise ValueError(f"driving-normal tokens {tuple(self._pending.shape)} do not match the patch "
                             f"tokens {tuple(output.shape)}")
        return output + self._pending.to(output.dtype)

    @contextlib.contextmanager
    def _driving_tokens(self, tokens: Tensor | None) -> Iterator[None]:
        self._pending = tokens
        try:
            yield
        finally:
            self._pending = None

    # -- conditions -----------------------------------------------------------------------------
    def i2v_condition(self, reference_latent: Tensor, reference_normal: Tensor | None = None,
                      keep_reference: Tensor | None = None, keep_reference_normal: Tensor | None = None) -> Tensor:
        """The 20 I2V condition channels: [mask | reference latent] + 𝓔_ref(N^R) at latent frame 0.

        ``reference_latent``: (B, 16, t, h, w), the codec's ``encode_reference``; ``keep_*``:
        per-sample 0/1 (B,) condition-dropout masks (None: keep)."""
        b, _, t, h, w = reference_latent.shape
        if self.flavor.reference_repeat:          # the reference in every latent frame (frame 0 codes it alone)
            reference_latent = reference_latent[:, :, :1].expand(-1, -1, t, -1, -1)
        mask = i2v_mask(b, t, h, w, reference_latent.device, reference_latent.dtype)
        if keep_reference is not None:
            reference_latent = reference_latent * keep_reference.view(b, 1, 1, 1, 1).to(reference_latent.dtype)
            mask = mask * keep_reference.view(b, 1, 1, 1, 1).to(mask.dtype)
        cond = torch.cat([mask, reference_latent], 1)
        if reference_normal is None:
            return cond
        ref = self.conditioning.reference(reference_normal.to(self.dtype))
        if ref.shape[-2:] != (h, w):
            raise ValueError(f"reference normal {tuple(reference_normal.shape[-2:])} does not map onto the latent "
                             f"grid {(h, w)} (needs 8x its size)")
        if keep_reference_normal is not None:
            ref = ref * keep_reference_normal.view(b, 1, 1, 1).to(ref.dtype)
        first = cond[:, :, :1] + ref[:, :, None].to(cond.dtype)
        return torch.cat([first, cond[:, :, 1:]], 2)

    def forward(self, noisy_latents: Tensor, timestep: Tensor, reference_latent: Tensor,
                driving_normals: Tensor | None = None, reference_normal: Tensor | None = None,
                image_embeds: Tensor | None = None, context: Tensor | None = None,
                keep: dict[str, Tensor] | None = None) -> Tensor:
        """Predicted velocity ε − x0, (B, 16, t, h, w).

        noisy_latents, reference_latent: (B, 16, t, h, w); timestep: (B,) in [0, 1000];
        driving_normals: (B, 3, 4(t-1)+1, 8h, 8w) in [-1, 1]; reference_normal: (B, 3, 8h, 8w);
        image_embeds: (B, 257, 1280) CLIP tokens, only for ``clip`` flavors; context: (B, N,
        text_dim) instead of the learned one; keep: condition-dropout masks from
        ``flow.condition_keep`` (keys ``driving``, ``reference``, ``reference_normal``)."""
        keep = keep or {}
        b, _, t, h, w = noisy_latents.shape
        sp = self.flavor.latent_space
        check_video_shape(VAE_TIME * (t - 1) + 1, sp * h, sp * w)   # the video these latents code
        if (image_embeds is None) != (self.transformer.config.image_dim is None):
            raise ValueError("image_embeds must be given exactly when the flavor has the CLIP path (clip=True)")
        cond = self.i2v_condition(reference_latent, reference_normal, keep.get("reference"),
                                  keep.get("reference_normal"))
        x = torch.cat([noisy_latents, cond.to(noisy_latents.dtype)], 1).to(self.dtype)
        tokens = None
        if driving_normals is not None:
            if driving_normals.shape[2] != VAE_TIME * (t - 1) + 1:
                raise ValueError(f"{driving_normals.shape[2]} driving frames do not match {t} latent frames "
                                 f"(needs {VAE_TIME * (t - 1) + 1})")
            if self.transformer.gradient_checkpointing and torch.is_grad_enabled():
                # its full-resolution activations would outweigh the checkpointed blocks' inputs
                tokens = torch.utils.checkpoint.checkpoint(self.conditioning.driving, driving_normals.to(self.dtype),
                                                           use_reentrant=False)
            else:
                tokens = self.conditioning.driving(driving_normals.to(self.dtype))
            if "driving" in keep:
                tokens = tokens * keep["driving"].view(b, 1, 1, 1, 1).to(tokens.dtype)
        if context is None:
            context = self.conditioning.context_batch(b)
        with self._driving_tokens(tokens):
            image = image_embeds.to(self.dtype) if image_embeds is not None else None
            out = self.transformer(x, timestep, context.to(self.dtype), encoder_hidden_states_image=image,
                                   return_dict=False)[0]
        return out

    # -- switches -------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.patch_embedding.weight.dtype

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each Wan block (diffusers' own switch) and the driving-normal encoder in the backward pass."""
        if enabled:
            self.transformer.enable_gradient_checkpointing()
        else:
            self.transformer.disable_gradient_checkpointing()

    @property
    def has_lora(self) -> bool:
        return bool(getattr(self.transformer, "peft_config", None))

    def add_lora(self, rank: int, alpha: int | None = None, targets: list[str] | None = None) -> None:
        """LoRA (peft, through diffusers' ``add_adapter``) on attention q/k/v/o and the FFN of every
        block; freezes the base transformer. The condition encoders and context stay trainable."""
        from peft import LoraConfig
        self.transformer.requires_grad_(False)
        self.transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights=True,
                                                target_modules=targets or LORA_TARGETS))
        # a patch embedding widened for I2V (new input channels) must learn: keep it trainable
        self.transformer.patch_embedding.requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # -- weights --------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> None:
        """Write the diffusers-layout folder described in the module doc (safetensors)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        flavor_config = asdict(self.flavor)
        (folder / "generator.json").write_text(json.dumps(
            {"flavor": self.flavor_name, "flavor_config": flavor_config}, indent=2))
        self.conditioning.save_pretrained(folder / "conditioning")
        if not self.has_lora:
            self.transformer.save_pretrained(folder / "transformer")
            return
        self.transformer.save_lora_adapter(folder / "lora")
        base = WanTransformer3DModel.from_config(self.transformer.config)   # clean keys, no peft wrappers
        state = {k.replace(".base_layer", ""): v for k, v in self.transformer.state_dict().items()
                 if "lora_" not in k}
        base.load_state_dict(state, strict=True, assign=True)
        base.save_pretrained(folder / "transformer")

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> "NormalDrivenWan":
        """Load a folder written by ``save_pretrained``; errors name the folder and the problem."""
        folder = Path(folder)
        if not folder.is_dir():
            raise WeightsFolderError(f"generator folder {folder} does not exist")
        if not (folder / "generator.json").is_file():
            raise WeightsFolderError(f"generator folder {folder}: no generator.json (not written by "
                                     f"NormalDrivenWan.save_pretrained; for an official Wan folder use from_wan)")
        meta = json.loads((folder / "generator.json").read_text())
        config = {k: v for k, v in meta["flavor_config"].items() if k != "codec"}   # dropped field (old exports)
        f = GeneratorFlavor(**{**config, "lora_rank": 0})
        check_weights_folder(folder / "transformer", WanTransformer3DModel, expected=_shape_entries(f))
        check_weights_folder(folder / "conditioning", GeneratorConditioning,
                             expected={"dim": f.dim, "text_dim": f.text_dim}
                             | ({"latent_channels": f.latent_channels, "latent_space": f.latent_space}
                                if f.latent_space != VAE_SPACE or f.latent_channels != LATENT_CHANNELS else {}))
        transformer = WanTransformer3DModel.from_pretrained(folder / "transformer", torch_dtype=dtype)
        conditioning = GeneratorConditioning.from_pretrained(folder / "conditioning", torch_dtype=dtype)
        model = cls(f, transformer, conditioning, flavor_name=meta["flavor"])
        lora = meta["flavor_config"].get("lora_rank", 0)
        if lora:
            if not (folder / "lora").is_dir():
                raise WeightsFolderError(f"generator folder {folder}: the flavor has LoRA but lora/ is missing")
            model.flavor = GeneratorFlavor(**meta["flavor_config"])
            model.transformer.requires_grad_(False)
            model.transformer.load_lora_adapter(str(folder / "lora"), prefix=None, adapter_name="default",
                                                weight_name="pytorch_lora_weights.safetensors")
            for name, p in model.transformer.named_parameters():   # the same trainable set as add_lora
                p.requires_grad_("lora_" in name or name.startswith("patch_embedding."))
        return model

    @classmethod
    def from_wan(cls, wan_folder: str | Path, flavor: GeneratorFlavor | str,
                 dtype: torch.dtype = torch.bfloat16) -> "NormalDrivenWan":
        """Start from an official Wan2.1 Diffusers checkpoint (``wan_folder/transformer``); fresh,
        zero-initialised condition encoders. A T2V checkpoint (in 16) gets its patch embedding
        widened to 36 input channels with zero weights on the new ones."""
        f = get_flavor(flavor) if isinstance(flavor, str) else flavor
        path = Path(wan_folder) / "transformer"
        if not path.is_dir() and (Path(wan_folder) / "config.json").is_file():
            path = Path(wan_folder)
        # in_channels may differ (T2V: 16, widened below); without CLIP an I2V folder's image path is dropped
        skip = {"in_channels"} if f.clip else {"in_channels", "image_dim", "added_kv_proj_dim"}
        shapes = {k: v for k, v in _shape_entries(f).items() if k not in skip}
        config = check_weights_folder(path, WanTransformer3DModel, expected=shapes)
        overrides = {} if f.clip else {"image_dim": None, "added_kv_proj_dim": None}
        transformer = WanTransformer3DModel.from_pretrained(path, torch_dtype=dtype, **overrides)
        if config["in_channels"] != f.in_channels:
            widen_patch_embedding(transformer, f.in_channels)
        model = cls(f, transformer, flavor_name=str(flavor) if isinstance(flavor, str) else "custom")
        model.conditioning.to(dtype)   # the transformer keeps diffusers' fp32 modules (torch_dtype above)
        return model


def _shape_entries(f: GeneratorFlavor) -> dict:
    c = f.transformer_config()
    return {k: c[k] for k in ("num_attention_heads", "attention_head_dim", "ffn_dim", "num_layers", "text_dim",
                              "in_channels", "image_dim", "added_kv_proj_dim")}


def widen_patch_embedding(transformer: WanTransformer3DModel, in_channels: int) -> None:
    """Give the patch embedding more input channels (zero weights on the new ones): a T2V
    checkpoint (16) becomes an I2V-shaped one (36) that starts out ignoring the condition."""
    old = transformer.patch_embedding
    new = nn.Conv3d(in_channels, old.out_channels, old.kernel_size, old.stride).to(old.weight.device, old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    transformer.patch_embedding = new
    transformer.register_to_config(in_channels=in_channels)


__all__ = ["LATENT_CHANNELS", "NormalDrivenWan", "i2v_mask", "widen_patch_embedding"]
