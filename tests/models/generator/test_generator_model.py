"""The generator (models/generator): shapes, training step, overfitting, token grid, flavors on
the meta device, weights folders, shape checks, flow-matching math and the sampler."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import WanTransformer3DModel

from models.generator import (LatentCodec, NormalDrivenWan, WeightsFolderError, check_video_shape, condition_keep,
                              flavor, flow_matching_loss, latent_shape, noisy_and_target, sample, sample_sigmas,
                              token_grid)
from models.generator.conditioning import GeneratorConditioning
from models.generator.flavors import FLAVORS

F, H, W = 5, 32, 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(b: int = 2, frames: int = F, h: int = H, w: int = W, seed: int = 0) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    t, lh, lw = latent_shape(frames, h, w)
    latents = torch.randn(b, 16, t, lh, lw, generator=g)
    cond = dict(reference_latent=torch.randn(b, 16, t, lh, lw, generator=g),
                driving_normals=torch.rand(b, 3, frames, h, w, generator=g) * 2 - 1,
                reference_normal=torch.rand(b, 3, h, w, generator=g) * 2 - 1)
    return latents, cond


@pytest.fixture()
def model() -> NormalDrivenWan:
    torch.manual_seed(0)
    return NormalDrivenWan("tiny_z16")


def test_forward_shapes_and_zero_init(model):
    latents, cond = _batch()
    ts = torch.tensor([100.0, 900.0])
    out = model(latents, ts, **cond)
    assert out.shape == latents.shape and torch.isfinite(out).all()
    # zero-initialised encoder outputs: at step 0 the normals change nothing (the base model)
    base = model(latents, ts, reference_latent=cond["reference_latent"])
    torch.testing.assert_close(out, base)


def test_training_step_reaches_encoders(model):
    latents, cond = _batch()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    for step in range(2):
        opt.zero_grad()
        loss, _ = flow_matching_loss(model, latents, cond, keep=condition_keep(2, 0.0, 0.0, 0.0))
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
    # after one step the zero-init output layers are non-zero, so gradients reach every layer
    for enc in (model.conditioning.driving, model.conditioning.reference):
        assert enc.proj.weight.grad.abs().sum() > 0
        assert enc.net[0].weight.grad.abs().sum() > 0
    assert model.conditioning.context.grad.abs().sum() > 0
    assert model.transformer.blocks[0].attn1.to_q.weight.grad.abs().sum() > 0


def test_condition_dropout_zeroes_the_normals(model):
    latents, cond = _batch()
    with torch.no_grad():   # make the encoders matter
        for p in model.conditioning.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ts = torch.tensor([500.0, 500.0])
    drop = {"driving": torch.tensor([0.0, 1.0]), "reference_normal": torch.tensor([0.0, 1.0])}
    out = model(latents, ts, **cond, keep=drop)
    full = model(latents, ts, **cond)
    bare = model(latents, ts, reference_latent=cond["reference_latent"])
    torch.testing.assert_close(out[0], bare[0])
    torch.testing.assert_close(out[1], full[1])
    assert not torch.allclose(full[0], bare[0])


def test_loss_falls_when_overfitting_one_batch(model):
    latents, cond = _batch(b=1, frames=5, h=16, w=16)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        g = torch.Generator().manual_seed(1)   # same σ and noise each step: a fixed objective
        loss, _ = flow_matching_loss(model, latents, cond, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses


@pytest.mark.parametrize("frames", [1, 5, 9, 17])
@pytest.mark.parametrize("size", [(16, 16), (32, 48), (64, 32)])
def test_normal_encoders_land_on_the_token_grid(frames, size):
    torch.manual_seed(0)
    f = flavor("tiny_z16")
    cond = GeneratorConditioning(dim=f.dim, text_dim=f.text_dim, context_tokens=4, normal_width=2)
    patch = torch.nn.Conv3d(f.in_channels, f.dim, (1, 2, 2), stride=(1, 2, 2))   # Wan's patch embedding
    h, w = size
    t, lh, lw = latent_shape(frames, h, w)
    with torch.no_grad():
        tokens = cond.driving(torch.zeros(1, 3, frames, h, w))
        ref = cond.reference(torch.zeros(1, 3, h, w))
        patched = patch(torch.zeros(1, f.in_channels, t, lh, lw))
    assert tokens.shape == patched.shape == (1, f.dim, *token_grid(frames, h, w))
    assert token_grid(frames, h, w) == ((frames - 1) // 4 + 1, h // 16, w // 16)
    assert ref.shape == (1, 20, lh, lw)


def _analytic_wan_params(heads: int, head_dim: int, ffn: int, layers: int, text_dim: int = 4096,
                         freq: int = 256, c_in: int = 36, c_out: int = 16) -> int:
    """Wan2.1 DiT parameter count from its architecture (independent of diffusers' code)."""
    d = heads * head_dim
    linear = lambda a, b: a * b + b   # noqa: E731
    embed = c_in * d * 4 + d                                              # patch (1,2,2)
    embed += linear(freq, d) + linear(d, d) + linear(d, 6 * d)            # time MLP + modulation
    embed += linear(text_dim, d) + linear(d, d)                           # text projection
    attn = 4 * linear(d, d) + 2 * d                                       # q k v o + RMS q/k norms
    block = 2 * attn + 2 * d + linear(d, ffn) + linear(ffn, d) + 6 * d    # self, cross, norm2, FFN, mod
    head = linear(d, c_out * 4) + 2 * d
    return embed + layers * block + head


@pytest.mark.parametrize("name,heads,ffn,layers,nominal", [("wan1.3b", 12, 8960, 30, 1.3e9),
                                                           ("wan14b", 40, 13824, 40, 1.4e10)])
def test_flavors_build_on_meta_to_the_published_sizes(name, heads, ffn, layers, nominal):
    with torch.device("meta"):
        m = NormalDrivenWan(name)
    n = sum(p.numel() for p in m.transformer.parameters())
    assert n == _analytic_wan_params(heads, 128, ffn, layers)
    # published names: Wan2.1 "1.3B" (1.42e9 in the T2V checkpoint) and "14B" (1.43e10)
    assert abs(n - nominal) / nominal < 0.1, n
    assert m.transformer.config.in_channels == 36 and m.transformer.config.image_dim is None


def test_lora_flavor_trains_adapters_only():
    with torch.device("meta"):
        m = NormalDrivenWan("wan14b_lora")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable)
    assert not any(n.endswith("to_q.base_layer.weight") for n in trainable)
    assert any(n.startswith("conditioning.") for n in trainable)
    with torch.device("meta"):
        clip = NormalDrivenWan(flavor("wan14b", clip=True))
    assert clip.transformer.config.added_kv_proj_dim == 5120 and clip.transformer.config.image_dim == 1280


def test_save_load_round_trip(model, tmp_path):
    with torch.no_grad():
        for p in model.conditioning.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "gen")
    for part in ("transformer", "conditioning"):
        assert (tmp_path / "gen" / part / "config.json").is_file()
        assert (tmp_path / "gen" / part / "diffusion_pytorch_model.safetensors").is_file()
    loaded = NormalDrivenWan.from_pretrained(tmp_path / "gen")
    latents, cond = _batch()
    ts = torch.tensor([300.0, 700.0])
    torch.testing.assert_close(loaded(latents, ts, **cond), model(latents, ts, **cond))
    assert loaded.flavor == model.flavor


def test_lora_round_trip(tmp_path):
    torch.manual_seed(0)
    m = NormalDrivenWan(flavor("tiny_z16", lora_rank=4))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    m.save_pretrained(tmp_path / "gen")
    loaded = NormalDrivenWan.from_pretrained(tmp_path / "gen")
    assert loaded.has_lora
    trainable = lambda model: {n for n, p in model.named_parameters() if p.requires_grad}   # noqa: E731
    assert trainable(loaded) == trainable(m)
    latents, cond = _batch()
    ts = torch.tensor([300.0, 700.0])
    torch.testing.assert_close(loaded(latents, ts, **cond), m(latents, ts, **cond))


def test_missing_or_mismatched_folder_fails_naming_it(model, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(WeightsFolderError, match=f"{missing}.*does not exist"):
        NormalDrivenWan.from_pretrained(missing)
    folder = tmp_path / "gen"
    model.save_pretrained(folder)
    config_path = folder / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["ffn_dim"] = 96                       # config no longer matches the stored weights
    config_path.write_text(json.dumps(config))
    with pytest.raises(WeightsFolderError, match=f"{folder / 'transformer'}.*config.json has ffn_dim=96"):
        NormalDrivenWan.from_pretrained(folder)
    # same flavor check bypassed: the weights themselves disagree with the config
    with pytest.raises(WeightsFolderError, match="disagree on .* tensors"):
        from models.generator import check_weights_folder
        check_weights_folder(folder / "transformer", WanTransformer3DModel)
    (folder / "conditioning" / "diffusion_pytorch_model.safetensors").unlink()
    config["ffn_dim"] = 128
    config_path.write_text(json.dumps(config))
    with pytest.raises(WeightsFolderError, match=f"{folder / 'conditioning'}.*no diffusion_pytorch_model"):
        NormalDrivenWan.from_pretrained(folder)


def test_from_wan_widens_a_t2v_checkpoint(tmp_path):
    f = flavor("tiny_z16")
    torch.manual_seed(0)
    t2v = WanTransformer3DModel(**{**f.transformer_config(), "in_channels": 16})
    t2v.save_pretrained(tmp_path / "wan" / "transformer")
    m = NormalDrivenWan.from_wan(tmp_path / "wan", "tiny_z16", dtype=torch.float32)
    w = m.transformer.patch_embedding.weight
    assert w.shape[1] == 36 and m.transformer.config.in_channels == 36
    torch.testing.assert_close(w[:, :16], t2v.patch_embedding.weight)
    assert (w[:, 16:] == 0).all()
    with pytest.raises(WeightsFolderError, match="num_attention_heads"):
        NormalDrivenWan.from_wan(tmp_path / "wan", flavor("tiny_z16", num_heads=8, head_dim=8), dtype=torch.float32)


def test_a_flavor_narrower_than_its_token_output_is_refused():
    """dim below latent_channels x patch (what a token outputs): the noise to remove is not
    representable, so sampling leaves it in (the old 128-wide tiny_z48: 192 outputs)."""
    with pytest.raises(ValueError, match="dim 128 .* below the 192 values"):
        flavor("tiny_z48", head_dim=32)
    assert flavor("tiny_z48").dim >= 192 and all(f.dim >= 4 * f.latent_channels for f in FLAVORS.values())


@pytest.mark.parametrize("frames,h,w,message", [(8, 32, 32, "frame count 8 .*4k\\+1"),
                                                (0, 32, 32, "frame count 0"),
                                                (9, 40, 32, "height 40 .*multiple of 16"),
                                                (9, 32, 8, "width 8 .*multiple of 16")])
def test_bad_frame_counts_and_sizes_fail_clearly(frames, h, w, message):
    with pytest.raises(ValueError, match=message):
        check_video_shape(frames, h, w)


def test_model_and_codec_reject_bad_shapes(model):
    latents, cond = _batch()
    cond["driving_normals"] = cond["driving_normals"][:, :, :4]
    with pytest.raises(ValueError, match="4 driving frames do not match 2 latent frames"):
        model(latents, torch.tensor([1.0, 1.0]), **cond)
    odd = torch.zeros(2, 16, 2, 3, 4)        # a 24-pixel-high video: not a multiple of 16
    with pytest.raises(ValueError, match="height 24 .*multiple of 16"):
        model(odd, torch.tensor([1.0, 1.0]), reference_latent=odd)
    codec = LatentCodec.tiny()
    with pytest.raises(ValueError, match="frame count 6"):
        codec.encode(torch.zeros(1, 3, 6, 32, 32))
    with pytest.raises(ValueError, match="height 24"):
        codec.encode_reference(torch.zeros(1, 3, 24, 32), 5)


def test_tiny_codec_shapes_and_save_load(tmp_path):
    codec = LatentCodec.tiny()
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    with torch.no_grad():
        z = codec.encode(video)
        ref = codec.encode_reference(video[:, :, 0], 5)
        rec = codec.decode(z)
    assert z.shape == ref.shape == (1, 16, 2, 4, 4) and z.dtype == torch.float32
    assert rec.shape == video.shape and rec.abs().max() <= 1
    codec.set_latent_stats(torch.full((16,), 0.5), torch.full((16,), 2.0))
    codec.save_pretrained(tmp_path / "vae")
    loaded = LatentCodec.from_pretrained(tmp_path / "vae")
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(video), (z - 0.5) / 2.0, atol=1e-5, rtol=1e-5)
    with pytest.raises(WeightsFolderError, match="does not exist"):
        LatentCodec.from_pretrained(tmp_path / "novae")


def test_flow_matching_math_is_fp32():
    x0 = torch.randn(3, 16, 2, 4, 4).to(torch.bfloat16)
    noise = torch.randn(3, 16, 2, 4, 4)
    sigma = torch.tensor([0.0, 1.0, 0.25])
    x_t, v = noisy_and_target(x0, sigma.to(torch.bfloat16), noise)
    assert x_t.dtype == v.dtype == torch.float32
    torch.testing.assert_close(x_t[0], x0[0].float())
    torch.testing.assert_close(x_t[1], noise[1])
    torch.testing.assert_close(x_t[2], 0.75 * x0[2].float() + 0.25 * noise[2])
    torch.testing.assert_close(v, noise - x0.float())
    g = torch.Generator().manual_seed(0)
    shifted = sample_sigmas(20000, "shifted", shift=5.0, generator=g)
    plain = sample_sigmas(20000, "shifted", shift=1.0, generator=g)
    assert 0 < shifted.min() and shifted.max() < 1 and shifted.mean() > plain.mean() + 0.2
    ln = sample_sigmas(20000, "logit_normal", shift=1.0, generator=g)
    assert abs(ln.median().item() - 0.5) < 0.02
    ln_shifted = sample_sigmas(20000, "logit_normal", shift=10.0, generator=g)   # median 10·½ / (1 + 9·½)
    assert abs(ln_shifted.median().item() - 10 / 11) < 0.02
    with pytest.raises(ValueError, match="unknown sigma sampling"):
        sample_sigmas(2, "cosine")


def test_sampler_with_guidance(model):
    latents, cond = _batch(b=1)
    a = sample(model, latents.shape, cond, steps=3, guidance=3.0, generator=torch.Generator().manual_seed(0),
               progress=True)
    b = sample(model, latents.shape, cond, steps=3, guidance=3.0, generator=torch.Generator().manual_seed(0))
    assert a.shape == latents.shape and torch.isfinite(a).all()
    torch.testing.assert_close(a, b)
    with torch.no_grad():   # make the normals matter
        for p in model.conditioning.parameters():
            p.add_(0.05 * torch.randn_like(p))
    seed = lambda: torch.Generator().manual_seed(0)   # noqa: E731
    # guidance 0 is the unconditional branch alone: sampling without the normals
    g0 = sample(model, latents.shape, cond, steps=3, guidance=0.0, generator=seed())
    bare = sample(model, latents.shape, {"reference_latent": cond["reference_latent"]}, steps=3, generator=seed())
    torch.testing.assert_close(g0, bare, atol=1e-5, rtol=1e-5)
    full = sample(model, latents.shape, cond, steps=3, generator=seed())
    assert not torch.allclose(full, bare, atol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients(model):
    latents, cond = _batch(b=1)
    with torch.no_grad():
        for p in model.conditioning.parameters():
            p.add_(0.05 * torch.randn_like(p))
    grads = []
    for on in (False, True):
        model.enable_gradient_checkpointing(on)
        model.zero_grad()
        loss, _ = flow_matching_loss(model, latents, cond, generator=torch.Generator().manual_seed(0))
        loss.backward()
        grads.append(model.conditioning.driving.net[0].weight.grad.clone())
    assert model.transformer.gradient_checkpointing
    torch.testing.assert_close(grads[0], grads[1])


def test_precomputed_context_from_a_file(model, tmp_path):
    from safetensors.torch import save_file
    ctx = torch.randn(5, model.flavor.text_dim)
    save_file({"context": ctx}, str(tmp_path / "ctx.safetensors"))
    model.conditioning.load_context(tmp_path / "ctx.safetensors")
    assert torch.equal(model.conditioning.context.data, ctx) and not model.conditioning.context.requires_grad
    latents, cond = _batch()
    assert model(latents, torch.tensor([10.0, 20.0]), **cond).shape == latents.shape
    model.save_pretrained(tmp_path / "gen")
    loaded = NormalDrivenWan.from_pretrained(tmp_path / "gen")
    assert torch.equal(loaded.conditioning.context.data, ctx)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        model.conditioning.load_context(tmp_path / "nope.safetensors")
    save_file({"context": torch.randn(5, 7)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"bad.safetensors: context must be \(tokens, 32\)"):
        model.conditioning.load_context(tmp_path / "bad.safetensors")


def test_clip_path_only_when_given():
    torch.manual_seed(0)
    m = NormalDrivenWan(flavor("tiny_z16", clip=True, context_tokens=512))
    latents, cond = _batch(b=1)
    out = m(latents, torch.tensor([400.0]), **cond, image_embeds=torch.randn(1, 257, 1280))
    assert out.shape == latents.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="image_embeds"):
        m(latents, torch.tensor([400.0]), **cond)
    with pytest.raises(ValueError, match="image_embeds"):
        NormalDrivenWan("tiny_z16")(latents, torch.tensor([400.0]), **cond, image_embeds=torch.randn(1, 257, 1280))
    with pytest.raises(ValueError, match="context_tokens=512"):
        flavor("tiny_z16", clip=True)


def test_bf16_model_and_batch_keep_the_loss_in_fp32(model):
    model.to(torch.bfloat16)   # what a bf16 DeepSpeed plugin does to every parameter and batch tensor
    latents, cond = _batch()
    cond = {k: v.to(torch.bfloat16) for k, v in cond.items()}
    loss, _ = flow_matching_loss(model, latents.to(torch.bfloat16), cond)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert model.conditioning.driving.proj.weight.grad.dtype == torch.bfloat16


def test_from_wan_drops_the_clip_path_of_an_i2v_checkpoint(tmp_path):
    f = flavor("tiny_z16", clip=True, context_tokens=512)
    torch.manual_seed(0)
    i2v = WanTransformer3DModel(**f.transformer_config())
    i2v.save_pretrained(tmp_path / "wan" / "transformer")
    m = NormalDrivenWan.from_wan(tmp_path / "wan", "tiny_z16", dtype=torch.float32)
    assert m.transformer.config.image_dim is None and m.transformer.config.added_kv_proj_dim is None
    torch.testing.assert_close(m.transformer.blocks[0].attn1.to_q.weight, i2v.blocks[0].attn1.to_q.weight)
    latents, cond = _batch(b=1)
    assert m(latents, torch.tensor([500.0]), **cond).shape == latents.shape
    with_clip = NormalDrivenWan.from_wan(tmp_path / "wan", f, dtype=torch.float32)
    torch.testing.assert_close(with_clip.transformer.condition_embedder.image_embedder.ff.net[0].proj.weight,
                               i2v.condition_embedder.image_embedder.ff.net[0].proj.weight)


def test_deepcopy_keeps_its_own_hook(model):
    import copy
    with torch.no_grad():
        for p in model.conditioning.parameters():
            p.add_(0.05 * torch.randn_like(p))
    twin = copy.deepcopy(model)            # what an EMA copy does
    with torch.no_grad():
        twin.conditioning.driving.proj.weight.zero_()
        twin.conditioning.driving.proj.bias.zero_()
    latents, cond = _batch()
    ts = torch.tensor([500.0, 500.0])
    bare = model(latents, ts, reference_latent=cond["reference_latent"])
    torch.testing.assert_close(twin(latents, ts, **{**cond, "reference_normal": None}), bare)
    assert not torch.allclose(model(latents, ts, **{**cond, "reference_normal": None}), bare)


def test_tiny_codec_trains_and_pixel_layout_round_trips():
    from models.generator import to_pixels, to_unit_video, vae_loss
    codec = LatentCodec.tiny(base_dim=8)
    x = torch.linspace(-1, 1, 16)
    video = (torch.sin(3 * x)[:, None] * torch.cos(2 * x)[None, :]).expand(1, 3, 1, 16, 16).clone()
    opt = torch.optim.Adam(codec.vae.parameters(), lr=2e-3)
    losses = []
    for _ in range(8):
        loss, logs = vae_loss(codec.vae, video)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(v) for v in logs.values()) and losses[-1] < 0.8 * losses[0], losses
    pixels = torch.randint(0, 256, (2, 5, 16, 16, 3), dtype=torch.uint8)
    unit = to_unit_video(pixels)
    assert unit.shape == (2, 3, 5, 16, 16) and unit.min() >= -1 and unit.max() <= 1
    assert torch.equal(to_pixels(unit), pixels)


def test_lora_with_checkpointing_trains_the_adapters_only():
    torch.manual_seed(0)
    m = NormalDrivenWan(flavor("tiny_z16", lora_rank=4))
    m.enable_gradient_checkpointing()
    latents, cond = _batch(b=1)
    before = m.transformer.blocks[0].attn1.to_q.base_layer.weight.clone()
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=1e-2)
    for _ in range(2):
        loss, _ = flow_matching_loss(m, latents, cond, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
    lora_b = m.transformer.blocks[0].attn1.to_q.lora_B["default"].weight
    assert lora_b.grad is not None and lora_b.grad.abs().sum() > 0
    assert m.transformer.blocks[1].ffn.net[2].lora_A["default"].weight.grad.abs().sum() > 0
    assert torch.equal(m.transformer.blocks[0].attn1.to_q.base_layer.weight, before)


def test_sharded_weights_folder_is_checked_shard_by_shard(tmp_path):
    from models.generator import check_weights_folder
    torch.manual_seed(0)
    wan = WanTransformer3DModel(**flavor("tiny_z16").transformer_config())
    folder = tmp_path / "wan" / "transformer"
    wan.save_pretrained(folder, max_shard_size="100KB")           # how the 14B checkpoints are stored
    shards = sorted(folder.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 1 and (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert check_weights_folder(folder, WanTransformer3DModel)["num_layers"] == 2
    m = NormalDrivenWan.from_wan(tmp_path / "wan", "tiny_z16", dtype=torch.bfloat16)
    assert m.dtype == torch.bfloat16 and m.conditioning.context.dtype == torch.bfloat16
    shards[-1].unlink()
    with pytest.raises(WeightsFolderError, match=f"{folder}: shard {shards[-1].name} .* is missing"):
        NormalDrivenWan.from_wan(tmp_path / "wan", "tiny_z16")
