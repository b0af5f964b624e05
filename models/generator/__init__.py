"""The generator: Wan2.1 I2V DiT (diffusers, unmodified) driven by normal maps; flow matching;
the Wan VAE codec; named flavors ``tiny_z16`` .. ``wan14b_lora``. nn.Modules and math only."""
from .codec import TINY_VAE, LatentCodec, SpaceToDepthVAE, codec_layout, to_pixels, to_unit_video, vae_loss
from .conditioning import DrivingNormalEncoder, GeneratorConditioning, ReferenceNormalEncoder
from .flavors import FLAVORS, GeneratorFlavor, check_video_shape, flavor, latent_shape, token_grid
from .flow import (condition_keep, flow_matching_loss, noisy_and_target, sample, sample_sigmas, shift_sigma,
                   timestep_of)
from .model import NormalDrivenWan, i2v_mask, widen_patch_embedding
from .pipeline import generate_video
from .weights import WeightsFolderError, check_weights_folder

__all__ = ["FLAVORS", "TINY_VAE", "DrivingNormalEncoder", "GeneratorConditioning", "GeneratorFlavor", "LatentCodec",
           "SpaceToDepthVAE", "codec_layout", "NormalDrivenWan", "ReferenceNormalEncoder", "WeightsFolderError",
           "check_video_shape", "check_weights_folder", "condition_keep", "flavor", "flow_matching_loss",
           "generate_video", "i2v_mask", "latent_shape", "noisy_and_target", "sample", "sample_sigmas", "shift_sigma",
           "timestep_of", "to_pixels", "to_unit_video", "token_grid", "vae_loss", "widen_patch_embedding"]
