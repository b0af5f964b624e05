"""The lossless fixed codec (``SpaceToDepthVAE`` behind ``LatentCodec``) and the generator on its
latent layout (z 48 at /2): exact round trip, shapes for 4k+1 frame counts, save/load, the
encoders on the finer token grid, sampling through ``generate_video``."""
from __future__ import annotations

import json

import pytest
import torch

from models.generator import (LatentCodec, NormalDrivenWan, SpaceToDepthVAE, WeightsFolderError, codec_layout,
                              flow_matching_loss, generate_video, token_grid)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("frames", [1, 5, 9, 17])
@pytest.mark.parametrize("spatial", [2, 4])
def test_round_trip_is_exact_and_latents_have_the_wan_layout(frames, spatial):
    codec = LatentCodec.space_to_depth(spatial)
    video = torch.rand(2, 3, frames, 32, 48, generator=torch.Generator().manual_seed(frames)) * 2 - 1
    z = codec.encode(video)
    assert z.shape == (2, 3 * spatial * spatial * 4, (frames - 1) // 4 + 1, 32 // spatial, 48 // spatial)
    assert codec.latent_channels == z.shape[1] and codec.spatial_factor == spatial
    assert torch.equal(codec.decode(z), video)                                  # bit-exact
    # latent frame 0 codes frame 0 alone, latent frame 1 frames 1-4 (Wan's causal layout)
    if frames >= 5:
        changed = video.clone()
        changed[:, :, 1:5] = 0
        z2 = codec.encode(changed)
        assert torch.equal(z2[:, :, 0], z[:, :, 0]) and not torch.equal(z2[:, :, 1], z[:, :, 1])
        if frames > 5:
            assert torch.equal(z2[:, :, 2:], z[:, :, 2:])


def test_pixel_layout_puts_each_block_in_one_latent_pixel():
    codec = LatentCodec.space_to_depth(2)
    video = torch.zeros(1, 3, 5, 16, 16)
    video[0, 1, 3, 6, 9] = 1.0                       # green, frame 3 (group 1, slot 2), pixel (6, 9)
    z = codec.encode(video)
    hot = (z != 0).nonzero().tolist()
    assert hot == [[0, ((1 * 4 + 2) * 2 + 0) * 2 + 1, 1, 3, 4]]   # channel (c, t, dy, dx), latent (1, 3, 4)


def test_normalisation_save_load_and_layout_from_the_config(tmp_path):
    codec = LatentCodec.space_to_depth()
    video = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    raw = codec.encode(video)
    codec.set_latent_stats(torch.full((48,), 0.25), torch.full((48,), 0.5))
    codec.save_pretrained(tmp_path / "codec")
    config = json.loads((tmp_path / "codec" / "config.json").read_text())
    assert config["_class_name"] == "SpaceToDepthVAE" and len(config["latents_mean"]) == 48
    assert codec_layout(tmp_path / "codec") == (48, 2)
    loaded = LatentCodec.from_pretrained(tmp_path / "codec")
    assert isinstance(loaded.vae, SpaceToDepthVAE)
    z = loaded.encode(video)
    torch.testing.assert_close(z, (raw - 0.25) / 0.5)
    torch.testing.assert_close(loaded.decode(z), video, atol=1e-6, rtol=0)
    ref = loaded.encode_reference(video[:, :, 0], 9)
    torch.testing.assert_close(loaded.decode(ref)[:, :, 0], video[:, :, 0], atol=1e-6, rtol=0)
    (tmp_path / "codec" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsFolderError, match="codec"):
        LatentCodec.from_pretrained(tmp_path / "codec")


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_generator_on_the_fixed_codec_layout(frames):
    torch.manual_seed(0)
    model = NormalDrivenWan("tiny_z48")
    codec = LatentCodec.space_to_depth()
    video = torch.rand(2, 3, frames, 32, 32) * 2 - 1
    normals = torch.rand(2, 3, frames, 32, 32) * 2 - 1
    tokens = model.conditioning.driving(normals)
    assert tokens.shape == (2, model.flavor.dim, *token_grid(frames, 32, 32, space=2))
    assert token_grid(frames, 32, 32, space=2)[1:] == (8, 8)                   # vs 2 x 2 with the Wan VAE's /8
    assert model.conditioning.reference(normals[:, :, 0]).shape == (2, 4 + 48, 16, 16)
    cond = dict(reference_latent=codec.encode_reference(video[:, :, 0], frames), driving_normals=normals,
                reference_normal=normals[:, :, 0])
    loss, _ = flow_matching_loss(model, codec.encode(video), cond)
    loss.backward()
    assert model.conditioning.driving.proj.weight.grad.abs().sum() > 0
    out = generate_video(model, codec, video[:, :, 0], normals, steps=2)
    assert out.shape == video.shape and out.abs().max() <= 1


def test_generator_folder_on_the_fixed_codec_round_trips(tmp_path):
    torch.manual_seed(0)
    model = NormalDrivenWan("tiny_z48")
    with torch.no_grad():
        model.conditioning.driving.proj.weight.normal_()
    model.save_pretrained(tmp_path / "gen")
    loaded = NormalDrivenWan.from_pretrained(tmp_path / "gen")
    assert (loaded.flavor.latent_channels, loaded.flavor.latent_space) == (48, 2)
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_reference_residual_runs_the_flow_relative_to_the_reference():
    """``reference_residual``: training and sampling are those of the same weights on latents
    minus the reference latent's frame 0 (repeated), and sampling adds it back."""
    from dataclasses import replace

    from models.generator import sample
    torch.manual_seed(0)
    residual = NormalDrivenWan("tiny_z48")
    plain = NormalDrivenWan(replace(residual.flavor, reference_residual=False))
    plain.load_state_dict(residual.state_dict())
    codec = LatentCodec.space_to_depth()
    video = torch.rand(2, 3, 5, 32, 32) * 2 - 1
    ref = codec.encode_reference(video[:, :, 0], 5)
    cond = dict(reference_latent=ref, driving_normals=torch.rand(2, 3, 5, 32, 32) * 2 - 1)
    base = ref[:, :, :1].expand_as(ref)
    latents = codec.encode(video)
    a, _ = flow_matching_loss(residual, latents, cond, generator=torch.Generator().manual_seed(1))
    b, _ = flow_matching_loss(plain, latents - base, cond, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    for guidance in (1.0, 2.0):
        x = sample(residual, latents.shape, cond, steps=3, guidance=guidance,
                   generator=torch.Generator().manual_seed(2))
        y = sample(plain, latents.shape, cond, steps=3, guidance=guidance, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(x, y + base)
