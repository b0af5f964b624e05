"""The generator on the training platform (training/tasks/generator.py): a step on real shards,
overfitting one batch, sidecar latents, driving normals rendered from a transfer module's Δf,
the CLI end to end (MLflow video, EMA export, `expportrait generate`), and a 2-process
DeepSpeed ZeRO-2 run that resumes to the uninterrupted run's weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "configs" / "train" / "dit_tiny_cpu.yaml"
SIZE, FRAMES = 64, 8          # tiny_corpus (conftest): 64², 8 frames per clip


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gen_shards(tmp_path_factory, tiny_corpus) -> Path:
    """Exact-truth shards of the shared tiny corpus (4 identities x 1 clip), one 8-frame sample per clip."""
    from training.data.truth_shards import write_truth_shards
    out = tmp_path_factory.mktemp("gen_shards")
    write_truth_shards(tiny_corpus, out, segment_frames=FRAMES, clips_per_shard=1)
    return out


@pytest.fixture(scope="module")
def codec_dir(tmp_path_factory) -> Path:
    """A (random) tiny codec saved as a diffusers folder: loaded like the real Wan VAE."""
    from models.generator import LatentCodec
    out = tmp_path_factory.mktemp("codec")
    LatentCodec.tiny(seed=0, base_dim=8).save_pretrained(out)
    return out


def a_batch(shards: Path, fields=("frames", "normals"), batch_size: int = 2) -> dict:
    from training.data.shards import ShardDataset, collate, shard_urls
    ds = ShardDataset(shard_urls(shards, "train"), batch_size, resampled=False, rank=0, world_size=1, fields=fields)
    return collate(list(ds))


def test_training_step_and_validation_on_shards(gen_shards, codec_dir):
    from training.tasks.generator import GeneratorTask
    torch.manual_seed(0)
    task = GeneratorTask(codec=str(codec_dir), frames=5, frame_stride=1, lr=1e-3)
    batch = a_batch(gen_shards)
    x = task.inputs(batch, torch.Generator().manual_seed(0), training=True)
    assert x["video"].shape == (2, 3, 5, SIZE, SIZE) and x["normals"].shape == x["video"].shape
    assert x["latents"].shape == x["reference_latent"].shape == (2, 16, 2, SIZE // 8, SIZE // 8)
    assert x["latents"].dtype == torch.float32 and x["video"].min() >= -1 and x["video"].max() <= 1
    loss = task.training_step(batch, 0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in task.model.named_parameters() if p.grad is not None}
    assert grads and any(g.abs().sum() > 0 for g in grads.values())
    assert task.model.conditioning.driving.proj.weight.grad.abs().sum() > 0   # the normals reach the loss
    task.validation_step(batch, 0)                                               # fixed σ grid, no error
    # the window: every frame_stride-th frame from the start; a window longer than the sample fails clearly
    strided = GeneratorTask(codec=str(codec_dir), frames=5, frame_stride=2)
    assert strided.frame_ids(torch.tensor([1])).tolist() == [[1, 3, 5, 7, 9]]
    with pytest.raises(ValueError, match="spans 17 frames"):
        GeneratorTask(codec=str(codec_dir), frames=9, frame_stride=2).window(FRAMES, 1, None, True)


def test_loss_falls_when_overfitting_one_batch(gen_shards, codec_dir):
    from training.tasks.generator import GeneratorTask
    torch.manual_seed(0)
    task = GeneratorTask(codec=str(codec_dir), frames=5, frame_stride=1, p_drop_driving=0.0,
                         p_drop_reference_normal=0.0, p_drop_reference=0.0)
    batch = a_batch(gen_shards)
    opt = torch.optim.AdamW(task.model.trainable_parameters(), lr=3e-3)
    losses = []
    for _ in range(40):      # global_step stays 0: the same window, noise and σ every time
        opt.zero_grad()
        loss = task.training_step(batch, 0)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses


def test_sidecar_latents_are_read_when_the_window_is_theirs(gen_shards, codec_dir):
    """With ``latents`` in the batch (stride 1, start 0) the task takes them; the Wan VAE is
    causal in time, so the first k+1 latents of a longer clip are those of its first 4k+1 frames."""
    from models.generator import LatentCodec
    from training.tasks.generator import GeneratorTask, unit
    batch = a_batch(gen_shards)
    codec = LatentCodec.from_pretrained(codec_dir)
    with torch.no_grad():
        clip = unit(batch["frames"][:, :9] if FRAMES >= 9 else torch.cat([batch["frames"]] * 2, 1)[:, :9])
        batch["latents"] = codec.encode(clip).half()                      # as the sidecar stores them
        batch["reference_latent"] = codec.encode_reference(clip[:, :, 0], 9).half()
    task = GeneratorTask(codec=str(codec_dir), frames=5, frame_stride=1, random_start=False, p_random_reference=0.0)
    x = task.inputs(batch, None, training=True)
    torch.testing.assert_close(x["latents"], batch["latents"][:, :, :2].float())
    torch.testing.assert_close(x["reference_latent"], batch["reference_latent"][:, :, :2].float())
    with torch.no_grad():
        fresh = codec.encode(unit(batch["frames"][:, :5]))
    torch.testing.assert_close(x["latents"], fresh, atol=2e-2, rtol=1e-2)     # fp16 storage
    later = GeneratorTask(codec=str(codec_dir), frames=5, frame_stride=1)
    later.window = lambda total, b, g, training: torch.tensor([1, 2])      # windows not at frame 0
    y = later.inputs(batch, None, training=True)                            # not the sidecar's: encoded
    assert not torch.allclose(y["latents"], x["latents"])


def test_driving_normals_rendered_from_the_transfer_modules_delta_f(gen_shards, codec_dir, tmp_path):
    """With an exported transfer module the driving normals are rendered from its Δf in the
    sample's own cameras: the same head silhouette as the shards' normals (the true Δf)."""
    from models.transfer import ExpressionTransfer
    from training.tasks.generator import RENDER_FIELDS, GeneratorTask
    from training.tasks.transfer import build_head
    head = build_head(None, 1)
    torch.manual_seed(0)
    ExpressionTransfer(num_face_vertices=head.num_face_vertices, flavor="tiny_cpu").save_pretrained(tmp_path / "tr")
    task = GeneratorTask(codec=str(codec_dir), frames=5, frame_stride=1, transfer_module=str(tmp_path / "tr"))
    batch = a_batch(gen_shards, fields=("frames", "normals", *RENDER_FIELDS))
    ids = task.frame_ids(torch.tensor([0, 1]))
    rendered = task.driving_normals(batch, ids)
    own = torch.stack([n[i] for n, i in zip(batch["normals"], ids)])
    assert rendered.shape == own.shape and rendered.dtype == torch.uint8
    fg_r, fg_o = rendered.amax(-1) > 0, own.amax(-1) > 0
    iou = (fg_r & fg_o).sum() / (fg_r | fg_o).sum()
    assert iou > 0.95, float(iou)
    x = task.inputs(batch, None, training=False)                            # windows at frame 0: sample 0's
    assert torch.equal(x["normals"][0], (rendered[0].float() / 127.5 - 1).permute(3, 0, 1, 2))


def _cli_config(tmp: Path, shards: Path, codec: Path, steps: int, extra_callbacks: list | None = None) -> Path:
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": None, "filename": "step{step:04d}", "auto_insert_metric_name": False,
                       "every_n_train_steps": 2, "save_last": True, "save_top_k": 2, "monitor": "step",
                       "mode": "max"}},
        {"class_path": "training.callbacks.EMA", "init_args": {"decay": 0.9, "export_dir": None}},
        {"class_path": "training.callbacks.GeneratorSamples", "init_args": {"every_n_epochs": 1, "steps": 2}},
        {"class_path": "training.callbacks.LogCheckpointsToMLflow"},
        *(extra_callbacks or []),
    ]
    cfg = {"trainer": {"max_steps": steps, "enable_progress_bar": False, "log_every_n_steps": 1,
                       "check_val_every_n_epoch": 1, "callbacks": callbacks},
           "model": {"init_args": {"codec": str(codec), "frames": 5, "frame_stride": 1, "warmup_steps": 1,
                                   "sample_steps": 2}},
           "data": {"init_args": {"root": str(shards), "batch_size": 2, "samples_per_epoch": 4, "val_samples": 1,
                                  "shuffle_buffer": 2}}}
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "test_run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_fit_logs_samples_exports_ema_and_generates(gen_shards, codec_dir, tmp_path):
    """The end-to-end slice: `training.train fit` with dit_tiny_cpu.yaml, the side-by-side video
    and the EMA export in MLflow, then `expportrait generate` from the checkpoint and the export."""
    import av
    import mlflow

    from expportrait.cli import main as expportrait
    from models.generator import NormalDrivenWan
    from training.train import build_cli
    out = tmp_path / "run"
    build_cli(["fit", "--config", str(BASE), "--config", str(_cli_config(tmp_path, gen_shards, codec_dir, 2)),
               "--out", str(out)])
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("generator").experiment_id])[0]
    assert run.data.params["flavor"] == yaml.safe_load(BASE.read_text())["model"]["init_args"]["flavor"]
    assert "train/loss" in run.data.metrics
    assert "val/loss" in run.data.metrics and "val/sample_psnr_db" in run.data.metrics
    # how the run samples, as `register` packs it (the YAML's sampler, the test config's window)
    sampling = json.loads(Path(client.download_artifacts(run.info.run_id, "sampling.json", str(tmp_path))).read_text())
    assert sampling == {"window": 5, "frame_stride": 1, "size": None, "steps": 2, "shift": 10.0, "guidance": 1.0}
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "videos")}
    assert "videos/samples_final.mp4" in arts
    with av.open(str(out / "mlartifacts" / run.info.run_id / "artifacts" / "videos" / "samples_final.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape[:2] == (SIZE, 4 * SIZE)      # ref | normals | generated | truth
    export = out / "export" / "ema"
    loaded = NormalDrivenWan.from_pretrained(export)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    shadow = ckpt["callbacks"]["EMA"]["shadow"]
    for name, value in loaded.named_parameters():
        assert torch.equal(value, shadow["model." + name]), name
    # `expportrait generate`: a reference image and a normal-map video -> mp4, from both sources
    import numpy as np
    from PIL import Image

    from preprocessing.video import write_video
    batch = a_batch(gen_shards, batch_size=1)
    Image.fromarray(batch["frames"][0, 0].numpy()).save(tmp_path / "ref.png")
    write_video(tmp_path / "normals.mp4", batch["normals"][0].numpy(), 25)
    for source in (["--weights", str(export), "--codec", str(codec_dir)],
                   ["--checkpoint", str(out / "checkpoints" / "last.ckpt")]):
        target = tmp_path / f"gen_{source[0][2:]}.mp4"
        assert expportrait(["generate", *source, "--reference", str(tmp_path / "ref.png"), "--normals",
                            str(tmp_path / "normals.mp4"), "--out", str(target), "--size", str(SIZE), "--steps", "2",
                            "--no-progress"]) == 0
        with av.open(str(target)) as c:
            got = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
        assert got.shape == (FRAMES, SIZE, SIZE, 3)
    assert expportrait(["generate", "--weights", str(tmp_path / "missing"), "--codec", str(codec_dir), "--reference",
                        str(tmp_path / "ref.png"), "--normals", str(tmp_path / "normals.mp4"), "--out",
                        str(tmp_path / "x.mp4")]) == 2


def _run_cli(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(REPO)]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "training.train", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.extended
@pytest.mark.slow
def test_deepspeed_zero2_two_processes_resume_to_the_uninterrupted_weights(gen_shards, codec_dir, tmp_path):
    """2 CPU processes under DeepSpeed ZeRO-2: an uninterrupted 4-step run, and a run SIGKILLed
    (both ranks) at step 3 then resumed (`--ckpt_path last`) from its step-2 checkpoint folder,
    end with the same weights and EMA, equal on both ranks."""
    from safetensors.torch import load_file

    from training.export import load_checkpoint_state
    strategy = str(REPO / "configs" / "train" / "strategy" / "deepspeed_cpu.yaml")
    kill = [{"class_path": "train_probes.KillAtStep", "init_args": {"step": 3}}]
    for name, out, probes, resume in (("full", "full", True, False), ("killed", "split", False, False),
                                      ("resumed", "split", True, True)):
        extra = [{"class_path": "train_probes.SaveRankWeights", "init_args": {"folder": str(tmp_path / f"w_{name}")}}] \
            if probes else kill
        cfg = _cli_config(tmp_path / f"cfg_{name}", gen_shards, codec_dir, 4, extra)
        args = ["fit", "--config", str(BASE), "--config", strategy, "--config", str(cfg), "--out", str(tmp_path / out)]
        r = _run_cli(args + (["--ckpt_path", "last"] if resume else []))
        if name == "killed":
            assert r.returncode != 0, r.stderr[-3000:]
            assert load_checkpoint_state(tmp_path / "split" / "checkpoints" / "last.ckpt")["global_step"] == 2
        else:
            assert r.returncode == 0, r.stderr[-4000:]
    w = {n: [load_file(str(tmp_path / f"w_{n}" / f"rank{r}.safetensors")) for r in range(2)]
         for n in ("full", "resumed")}
    for k in w["full"][0]:
        assert torch.equal(w["full"][0][k], w["full"][1][k]), k              # ranks agree
        assert torch.equal(w["resumed"][0][k], w["resumed"][1][k]), k
        assert torch.equal(w["full"][0][k], w["resumed"][0][k]), k           # resume = uninterrupted
    ckpt = tmp_path / "split" / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir()                                                    # a DeepSpeed folder
    state = load_checkpoint_state(ckpt)
    assert state["global_step"] == 4 and state["callbacks"]["EMA"]["updates"] == 4
    full = load_checkpoint_state(tmp_path / "full" / "checkpoints" / "last.ckpt")["callbacks"]["EMA"]["shadow"]
    for k, v in state["callbacks"]["EMA"]["shadow"].items():
        assert torch.equal(v, full[k]), k


def test_fixed_codec_from_the_cli_sets_the_latent_layout(gen_shards, tmp_path):
    """``codec --kind space_to_depth`` writes the lossless codec with the training frames' latent
    statistics; a task given that folder trains on its layout (z 48 at /2) whatever the flavor's
    own layout, and refuses a flavor too narrow for it (tiny_z16: 64 wide, 192 values a token)."""
    from models.generator import LatentCodec
    from training.tasks.generator import GeneratorTask, main
    assert main(["codec", "--shards", str(gen_shards), "--out", str(tmp_path / "s2d"), "--kind", "space_to_depth",
                 "--frames", "5"]) == 0
    summary = json.loads((tmp_path / "s2d" / "training.json").read_text())
    assert summary["kind"] == "space_to_depth" and summary["history"][-1]["psnr_db"] > 90   # lossless
    codec = LatentCodec.from_pretrained(tmp_path / "s2d")
    assert codec.latent_channels == 48 and any(m != 0 for m in codec.vae.config.latents_mean)
    with pytest.raises(ValueError, match="dim 64 .* below the 192 values"):
        GeneratorTask(flavor="tiny_z16", codec=str(tmp_path / "s2d"), frames=5, frame_stride=1)
    torch.manual_seed(0)
    task = GeneratorTask(flavor="tiny_z16", flavor_overrides={"head_dim": 48}, codec=str(tmp_path / "s2d"),
                         frames=5, frame_stride=1)
    assert (task.model.flavor.latent_channels, task.model.flavor.latent_space) == (48, 2)
    batch = a_batch(gen_shards)
    x = task.inputs(batch, torch.Generator().manual_seed(0), training=True)
    assert x["latents"].shape == (2, 48, 2, SIZE // 2, SIZE // 2)
    torch.testing.assert_close(codec.decode(x["latents"]), x["video"], atol=1e-5, rtol=0)
    loss = task.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and task.model.conditioning.driving.proj.weight.grad.abs().sum() > 0


def test_augmentation_is_one_draw_per_window_and_mirrors_normals(gen_shards, codec_dir):
    """Colour: the same gain and offset on every frame of a sample (the reference included);
    flip: frames and normal maps mirrored together, the normals' x negated on the head only;
    no augmentation in validation."""
    from training.tasks.generator import augment_window, unit
    batch = a_batch(gen_shards, batch_size=4)
    video, normals = unit(batch["frames"]), unit(batch["normals"])
    g = torch.Generator().manual_seed(0)
    v2, n2 = augment_window(video, normals, color=0.3, generator=g)
    assert torch.equal(n2, normals) and not torch.equal(v2, video)
    inside = (video.abs() < 0.6) & (v2.abs() < 0.99)                  # unclipped pixels: an affine map per channel
    for b in range(4):
        for c in range(3):
            x, y = video[b, c][inside[b, c]], v2[b, c][inside[b, c]]
            slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
            assert torch.allclose(y, slope * x + (y.mean() - slope * x.mean()), atol=1e-4)   # one map for all frames
    for seed in range(20):                     # a draw that mirrors some samples and not others
        v3, n3 = augment_window(video, normals, flip=True, generator=torch.Generator().manual_seed(seed))
        mirrored = [b for b in range(4) if not torch.equal(v3[b], video[b])]
        if 0 < len(mirrored) < 4:
            break
    assert 0 < len(mirrored) < 4
    for b in mirrored:
        assert torch.equal(v3[b], video[b].flip(-1))
        head = normals[b].flip(-1) > -1 + 1e-3
        assert torch.equal(n3[b, 0][head[0]], -normals[b, 0].flip(-1)[head[0]])
        assert torch.equal(n3[b, 1:], normals[b, 1:].flip(-1))
        assert (n3[b][:, ~head.any(0)] == -1).all()                      # background untouched
    for b in set(range(4)) - set(mirrored):
        assert torch.equal(v3[b], video[b]) and torch.equal(n3[b], normals[b])
    from training.tasks.generator import GeneratorTask
    task = GeneratorTask(codec=str(codec_dir), frames=5, frame_stride=1, random_start=False, augment_color=0.5,
                         augment_flip=True)
    val = task.inputs(batch, None, training=False)
    assert torch.equal(val["video"], video[:, :, :5]) and torch.equal(val["normals"], normals[:, :, :5])
    train = task.inputs(batch, torch.Generator().manual_seed(0), training=True)
    assert not torch.equal(train["video"], video[:, :, :5])


def test_random_reference_takes_frame_0_from_elsewhere_in_the_sample(gen_shards, codec_dir):
    """``p_random_reference``: training windows whose reference (frame 0: image and normal map) is
    another frame of the sample, the driven frames unchanged; validation windows never."""
    from training.tasks.generator import GeneratorTask, unit
    batch = a_batch(gen_shards)
    frames, normals = unit(batch["frames"]), unit(batch["normals"])
    task = GeneratorTask(codec=str(codec_dir), frames=5, frame_stride=1, random_start=False, p_random_reference=1.0)
    assert task.frames_read is None                  # the reader decodes whole samples: references come from anywhere
    val = task.inputs(batch, None, training=False)
    assert torch.equal(val["reference_image"], frames[:, :, 0])
    for seed in range(20):       # a draw where a reference moved off frame 0
        x = task.inputs(batch, torch.Generator().manual_seed(seed), training=True)
        if not torch.equal(x["reference_image"], frames[:, :, 0]):
            break
    assert not torch.equal(x["reference_image"], frames[:, :, 0])
    assert torch.equal(x["video"][:, :, 1:], frames[:, :, 1:5])
    assert torch.equal(x["normals"][:, :, 1:], normals[:, :, 1:5])
    for b in range(frames.shape[0]):         # each reference is a frame of its sample, with its own normal map
        k = next(k for k in range(frames.shape[2]) if torch.equal(frames[b, :, k], x["reference_image"][b]))
        assert torch.equal(x["reference_normal"][b], normals[b, :, k]) and torch.equal(x["video"][b, :, 0],
                                                                                        frames[b, :, k])


def test_misalign_normals_moves_reference_and_driving_maps_apart():
    """Frame 0 and the driving frames each get their own sub-pixel similarity (the driving
    frames one draw); 0 px changes nothing; the background stays -1 away from the head."""
    from training.tasks.generator import misalign_normals
    n = -torch.ones(2, 3, 5, 32, 32)
    n[:, :, :, 10:22, 12:20] = torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1, 1)
    torch.testing.assert_close(misalign_normals(n, 0.0, torch.Generator().manual_seed(0)), n)
    m = misalign_normals(n, 1.0, torch.Generator().manual_seed(0))
    assert m.shape == n.shape and not torch.equal(m, n)
    assert not torch.allclose(m[:, :, 0], m[:, :, 1])                      # reference apart from the driving maps
    for k in (2, 3, 4):
        torch.testing.assert_close(m[:, :, k], m[:, :, 1])                 # one draw for the driving frames
    assert (m[:, :, :, :6] == -1).all() and (m[:, :, :, 28:] == -1).all()  # moved by ~1 px, not more


@pytest.mark.extended          # ~1 min of compiling on CPU; the generator benchmark trains with it
def test_compiled_step_matches_the_eager_one_and_keeps_the_state_dict(gen_shards, codec_dir):
    """``compile``: the training step's loss and gradients are the eager module's (same parameters),
    and nothing compiled enters the state dict (checkpoints, EMA and exports are unchanged)."""
    from training.tasks.generator import GeneratorTask
    torch.manual_seed(0)
    task = GeneratorTask(codec=str(codec_dir), frames=5, frame_stride=1, compile=True)
    batch = a_batch(gen_shards)
    assert task.step_model() is task.step_model() and task.step_model() is not task.model
    plain = GeneratorTask(codec=str(codec_dir), frames=5, frame_stride=1)
    assert plain.model is not None and task.state_dict().keys() == plain.state_dict().keys()    # built, same keys
    losses, grads = [], []
    for compiled in (False, True):
        task.hparams.compile = compiled
        loss = task.training_step(batch, 0)          # global_step 0: the same window, noise and σ
        loss.backward()
        losses.append(loss.detach())
        grads.append(task.model.conditioning.driving.proj.weight.grad.clone())
        task.model.zero_grad()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-5)
