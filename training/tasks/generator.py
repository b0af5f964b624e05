"""LightningModule of the generator (the model itself: models/generator), and the tiny codec's training.

A step, as the paper trains (ExpPortrait §3.3):

1. a window of ``frames`` = 4k+1 frames of a shard sample, every ``frame_stride``-th frame,
   starting at a random frame (training) or at 0 (validation); its first frame is the
   reference image, the rest is what the model learns to generate;
2. the **driving normals**: with ``transfer_module`` (an exported expression-transfer folder,
   frozen), the head is re-posed with the sample's (ψ, jaw, pose, camera, β, Δg) and the Δf
   *that module predicts* from (ψ, jaw) and the identity's neutral mesh, and rendered to normal
   maps in the sample's cameras: the normals the generator sees at inference, where Δf always
   comes from the module. Without one, the shards' own normal maps (rendered from the
   fitted/true Δf) are used and the task says so in its log;
3. clean latents: the latent sidecar's (``ShardDataModule(latents=...)``) when the batch
   carries them and the window is the sidecar's (stride 1, start 0), else encoded on the fly by
   the frozen codec (``codec``: a local diffusers folder of an ``AutoencoderKLWan``);
4. flow matching: noise, σ and the target v = ε − x0 built in fp32 inside the step
   (``models.generator.flow``), whatever dtype the precision plugin gave the batch; per-sample
   condition dropout for guidance; the loss in fp32.

Frozen parts (codec, head model, transfer module) are kept out of the module tree: they are not
trained, not wrapped by DeepSpeed, not cast by the precision plugin, and not saved in checkpoints
(their folders are hyperparameters). Noise, σ, dropout and the window are drawn from a generator
seeded by (seed, step, rank), so a resumed run draws what the uninterrupted one would have.

The tiny codec (``tiny_z16``): no Wan VAE weights exist here, so :func:`train_codec` trains a
tiny ``AutoencoderKLWan`` (``models.generator.codec.TINY_VAE``: same class, z 16, 4x time, 8x
space) on the corpus's training shards, sets its per-channel latent statistics and saves it
as a diffusers folder; the generator then loads it exactly as it loads the real Wan VAE::

    python -m training.tasks.generator codec --shards SHARDS --out CODEC_DIR [--steps 600]
"""
from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor

from models.generator import (LatentCodec, NormalDrivenWan, codec_layout, condition_keep, flavor as get_flavor,
                              flow_matching_loss, generate_video, noisy_and_target, timestep_of, vae_loss)
from models.generator.flow import residual_base
from models.generator.frames import resize_video, transfer_normal_maps, unit
from models.generator.flavors import check_video_shape
from models.metrics import psnr_from_mse
from training.tasks.reader_skips import ReaderSkipsMixin
from training.tasks.sharded import build_partitioned, zero3_partitioning

#: what a generator step decodes: frames and normal maps (+ what re-rendering normals needs)
GENERATOR_FIELDS = ("frames", "normals")
RENDER_FIELDS = ("smplx", "static_offsets", "face_vertex_ids")


def sampler_settings(hparams: dict) -> dict:
    """How a generator task's hyperparameters say to sample: ``shift`` (``sample_shift``, else
    the training ``shift``) and ``steps`` (``sample_steps``); None where they say nothing."""
    shift = hparams.get("sample_shift")
    return {"shift": hparams.get("shift") if shift is None else shift, "steps": hparams.get("sample_steps")}


def misalign_normals(normals: Tensor, shift_px: float, generator: torch.Generator | None = None) -> Tensor:
    """Normal maps (B, 3, F, H, W) in [-1, 1] whose reference (frame 0) and driving frames (1..)
    are moved apart: each by its own random similarity per sample (translation up to
    ``shift_px`` pixels, scale by up to the same displacement at the border; the driving frames
    share one draw), resampled bilinearly over the background (-1). What the fitted path gives
    the model: its reference map (the source image fitted alone) and its driving maps (the
    driver's clip fit, retargeted) come from two fits whose errors do not cancel."""
    import torch.nn.functional as F
    b, _, f, h, w = normals.shape
    out = []
    for part in (normals[:, :, :1], normals[:, :, 1:]):
        if part.shape[2] == 0:
            continue
        draw = lambda *shape: (2 * torch.rand(*shape, generator=generator) - 1)      # noqa: E731
        scale = 1 + draw(b) * shift_px / (min(h, w) / 2)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
        theta[:, 0, 2], theta[:, 1, 2] = draw(b) * 2 * shift_px / w, draw(b) * 2 * shift_px / h
        theta = theta.to(part)
        frames = part.permute(0, 2, 1, 3, 4).reshape(-1, 3, h, w) + 1                   # background 0
        grid = F.affine_grid(theta.repeat_interleave(part.shape[2], 0), list(frames.shape), align_corners=False)
        moved = F.grid_sample(frames, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
        out.append(moved.reshape(b, part.shape[2], 3, h, w).permute(0, 2, 1, 3, 4))
    return torch.cat(out, 2)


def augment_window(video: Tensor, normals: Tensor, color: float = 0.0, flip: bool = False,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Training augmentation of windows (B, 3, F, H, W) in [-1, 1], drawn per sample and the same
    for every frame of it (the reference frame included):

    - ``color`` c: a per-channel gain in [1 − c, 1 + c] and offset in [−c, c] on the frames, so
      the model has to take a head's colours from the reference image instead of recalling them
      from a training identity's shape (normal maps are untouched);
    - ``flip``: a horizontal mirror with probability 1/2, of the frames and of the normal maps,
      whose x component (view convention: R) is negated on the head; the background stays 0."""
    b = video.shape[0]
    if color > 0:
        draw = lambda: (2 * torch.rand(b, 3, 1, 1, 1, generator=generator) - 1).to(video)   # noqa: E731
        gain, offset = 1 + color * draw(), color * draw()
        video = (video * gain + offset).clamp(-1, 1)
    if flip:
        mirror = (torch.rand(b, generator=generator) < 0.5).view(b, 1, 1, 1, 1).to(video.device)
        fv, fn = video.flip(-1), normals.flip(-1)
        head = (fn > -1 + 1e-3).any(1, keepdim=True)            # background is (-1, -1, -1)
        fn = torch.cat([torch.where(head, -fn[:, :1], fn[:, :1]), fn[:, 1:]], 1)
        video, normals = torch.where(mirror, fv, video), torch.where(mirror, fn, normals)
    return video, normals


def scaled_lr(lr: float, global_batch: int, reference_batch: int | None, rule: str = "sqrt") -> float:
    """The learning rate for ``global_batch`` samples a step when ``lr`` was set for
    ``reference_batch`` (None: ``lr`` as given): ``sqrt`` (Adam: lr ∝ √batch, the usual rule for
    Adam-family optimizers), ``linear`` (lr ∝ batch, Goyal et al., SGD-style) or ``none``."""
    if reference_batch is None or rule == "none":
        return lr
    if rule not in ("sqrt", "linear"):
        raise ValueError(f"unknown lr_scaling {rule!r}; known: sqrt, linear, none")
    ratio = global_batch / reference_batch
    return lr * (ratio if rule == "linear" else math.sqrt(ratio))


class GeneratorTask(ReaderSkipsMixin, pl.LightningModule):
    """Trains :class:`NormalDrivenWan` of flavor ``flavor`` on shards (see the module docstring).

    Weights: ``pretrained`` (a ``NormalDrivenWan.save_pretrained`` folder) or ``wan_folder``
    (an official Wan2.1 Diffusers checkpoint, ``NormalDrivenWan.from_wan``), else random.
    ``codec``: a local ``AutoencoderKLWan`` folder (the Wan VAE, or the tiny one from
    :func:`train_codec`; ``codec_subfolder`` e.g. ``vae``); None: a *random* tiny codec (shape
    tests only; warns). ``dtype``: of the loaded weights (the precision plugin casts anyway).
    ``lr_reference_batch``, ``lr_scaling``: the learning-rate rule for another global batch
    (:func:`scaled_lr`; None: ``lr`` as given).
    ``p_random_reference``: the probability that a training window's reference (its frame 0) is
    another frame of the sample, drawn uniformly, instead of the window's first: the pose and
    expression gaps between the reference and the driven frames that cross-reenactment has (its
    source image is no frame of the driving clip; later windows are far from it in time). It
    needs decoded frames: training on sidecar latents alone (the ``wan*`` configs) sets it to 0.
    ``misalign_normals_px``: > 0 moves the reference normal map and the driving ones apart by
    random sub-pixel similarities in training (:func:`misalign_normals`), as two fits do.
    ``compile``: the training step calls the model through ``torch.compile`` (the same
    parameters; checkpoints, the EMA and validation see the plain module). The tiny_cpu recipe
    on a 2-core CPU: any gain is within the host's noise (400-step pairs back to back: equal;
    19-minute trainings: 4490-4660 steps compiled, 3720-4380 eager), after 10 s (warm cache) to
    ~1 min of compiling; docs/experiments, runs 22-23.
    ``flavor_overrides``: fields of the flavor, e.g. ``{lora_rank: 64}``. The defaults are the
    ``tiny_cpu`` recipe's (``configs/train/dit_tiny_cpu.yaml``; a test keeps them equal).

    The model is built in :meth:`configure_model` (under ZeRO-3: partitioned as it is created,
    see :mod:`training.tasks.sharded`), or on first use of ``task.model`` outside ``fit``."""

    #: batch entries of geometry (SMPL-X parameters and cameras, static offsets): left fp32 by the
    #: precision plugin of ``training.strategies`` under bf16 (the rest of the batch is cast)
    fp32_batch_keys = ("smplx", "static_offsets")

    def __init__(self, flavor: str = "tiny_z16", flavor_overrides: dict | None = None,
                 pretrained: str | None = None, wan_folder: str | None = None,
                 codec: str | None = None, codec_subfolder: str | None = None,
                 transfer_module: str | None = None, head_model: str | None = None, subdivision: int = 1,
                 frames: int = 5, frame_stride: int = 4, size: int | None = None, random_start: bool = True,
                 lr: float = 0.004, weight_decay: float = 0.01, warmup_steps: int = 50, min_lr_ratio: float = 0.1,
                 optimizer: str = "adamw", sigma_kind: str = "shifted", shift: float = 10.0,
                 p_drop_driving: float = 0.05, p_drop_reference: float = 0.0,
                 p_drop_reference_normal: float = 0.05, augment_color: float = 0.0, augment_flip: bool = False,
                 p_random_reference: float = 0.5, misalign_normals_px: float = 0.0,
                 gradient_checkpointing: bool = False, compile: bool = False,
                 sample_steps: int = 4, sample_shift: float | None = 10.0, guidance: float = 1.0, seed: int = 0,
                 dtype: str = "float32", lr_reference_batch: int | None = None, lr_scaling: str = "sqrt") -> None:
        super().__init__()
        self._reset_reader_skips()
        self.save_hyperparameters()
        self._frozen: dict = {"codec": None, "head": None, "transfer": None}   # out of the module tree
        self._warned: set[str] = set()
        self.flavor_config = self._flavor()        # checks the flavor (and its codec layout) before any build

    # -- construction -----------------------------------------------------------------------
    def _flavor(self):
        """The flavor with ``flavor_overrides`` and the codec's latent layout applied."""
        hp = self.hparams
        overrides = dict(hp.flavor_overrides or {})
        if hp.codec:                                # the latent layout follows the codec (Wan VAE: z 16, /8)
            z, space = codec_layout(hp.codec, hp.codec_subfolder)
            base = get_flavor(hp.flavor)
            if (z, space) != (base.latent_channels, base.latent_space):
                overrides.setdefault("latent_channels", z)
                overrides.setdefault("latent_space", space)
        return get_flavor(hp.flavor, **overrides)

    def __getattr__(self, name: str):
        # ``task.model`` before Lightning's ``configure_model`` (a script, a test, the exporter): build it now,
        # whole, on this process; inside ``fit`` Lightning calls ``configure_model`` first (sharded under ZeRO-3)
        if name == "model" and "model" not in self.__dict__.get("_modules", {}) and "_frozen" in self.__dict__:
            self.configure_model()
        return super().__getattr__(name)

    def configure_model(self) -> None:
        """Build the model once (idempotent). Lightning calls this inside ``deepspeed.zero.Init`` under
        ZeRO-3, so every parameter is partitioned over the ranks as its layer is created and no rank
        ever holds the whole model; weights (``pretrained`` / ``wan_folder``) are then read by rank 0
        only and copied in layer by layer under ``GatheredParameters`` (:mod:`training.tasks.sharded`).
        Elsewhere the model is built whole, weights loaded by diffusers."""
        if "model" in self._modules:
            return
        hp, f = self.hparams, self.flavor_config
        weights_dtype = getattr(torch, hp.dtype)    # bfloat16: load real-scale weights at half the host memory
        if zero3_partitioning(self):
            model = build_partitioned(f, hp.flavor, pretrained=hp.pretrained, wan_folder=hp.wan_folder)
        elif hp.pretrained:
            model = NormalDrivenWan.from_pretrained(hp.pretrained, dtype=weights_dtype)
        elif hp.wan_folder:
            model = NormalDrivenWan.from_wan(hp.wan_folder, f if f != get_flavor(hp.flavor) else hp.flavor,
                                             dtype=weights_dtype)
        else:
            model = NormalDrivenWan(f, flavor_name=hp.flavor)
        mf = model.flavor
        if hp.codec and (mf.latent_channels, mf.latent_space) != codec_layout(hp.codec, hp.codec_subfolder):
            layout = codec_layout(hp.codec, hp.codec_subfolder)
            raise ValueError(f"codec {hp.codec} codes z={layout[0]} at /{layout[1]}, the generator expects "
                             f"z={mf.latent_channels} at /{mf.latent_space}")
        if hp.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        # LoRA: checkpoints hold only the trainable parameters (DeepSpeed's exclude_frozen_parameters);
        # on resume the frozen base stays as built from wan_folder / pretrained
        self.strict_loading = not model.has_lora
        self.model = model

    # -- frozen parts -----------------------------------------------------------------------
    @property
    def codec(self) -> LatentCodec:
        if self._frozen["codec"] is None:
            if self.hparams.codec:
                codec = LatentCodec.from_pretrained(self.hparams.codec, self.hparams.codec_subfolder)
            else:
                self._warn("codec", "no codec folder given: a random tiny Wan VAE (shape tests only; train one "
                                    "with `python -m training.tasks.generator codec`)")
                codec = LatentCodec.tiny(seed=0)
            self._frozen["codec"] = codec.requires_grad_(False).eval().to(self.device)
        return self._frozen["codec"]

    def _transfer(self):
        """(head, transfer module) when ``transfer_module`` is given, else None."""
        if not self.hparams.transfer_module:
            return None
        if self._frozen["transfer"] is None:
            from models.transfer import ExpressionTransfer
            from training.tasks.transfer import build_head
            self._frozen["head"] = build_head(self.hparams.head_model, self.hparams.subdivision)
            self._frozen["transfer"] = ExpressionTransfer.from_pretrained(self.hparams.transfer_module).eval()
            self._frozen["transfer"].requires_grad_(False)
        return self._frozen["head"], self._frozen["transfer"]

    def setup(self, stage: str) -> None:
        if not self.hparams.transfer_module:
            self._warn("normals", "no transfer_module: driving normals are the shards' own (rendered from the "
                                  "fitted/true Δf), not the transfer module's Δf as the paper trains")

    @property
    def window_span(self) -> int:
        """Frames a training window spans: ``(frames - 1) * frame_stride + 1``; the reader drops
        (and counts) samples shorter than this (``ShardDataModule``)."""
        return (self.hparams.frames - 1) * self.hparams.frame_stride + 1

    @property
    def frames_read(self) -> int | None:
        """Frames of a training sample the step reads: the window's span when windows start at
        frame 0 (``random_start`` false) and take their reference there (``p_random_reference``
        0), else None (all); the reader decodes no more."""
        return None if self.hparams.random_start or self.hparams.p_random_reference > 0 else self.window_span

    def sampling_record(self) -> dict:
        """How this run samples, as inference must repeat it (``InferenceSettings`` fields):
        window, stride, size (None: the shards' crop size), sampler steps, shift and guidance."""
        return {"window": self.hparams.frames, "frame_stride": self.hparams.frame_stride,
                "size": self.hparams.size, "steps": self.hparams.sample_steps, "shift": self.sample_shift,
                "guidance": self.hparams.guidance}

    def on_fit_start(self) -> None:
        """Log :meth:`sampling_record` as the run's ``sampling.json`` (what ``register`` packs)."""
        from lightning.pytorch.loggers import MLFlowLogger
        if self.global_rank == 0:
            for logger in self.loggers:
                if isinstance(logger, MLFlowLogger):
                    logger.experiment.log_dict(logger.run_id, self.sampling_record(), "sampling.json")

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=2)

    @property
    def needs_render_fields(self) -> bool:
        return bool(self.hparams.transfer_module)

    # -- batch -> model inputs --------------------------------------------------------------
    def window(self, total: int, batch: int, generator: torch.Generator | None, training: bool) -> Tensor:
        """Start frame per sample (B,) of a window of ``frames`` frames every ``frame_stride``."""
        span = self.window_span
        if span > total:           # the datamodule's reader drops such samples; a batch from elsewhere may not
            raise ValueError(f"a window of {self.hparams.frames} frames every {self.hparams.frame_stride} spans "
                             f"{span} frames, the samples have {total}: cut longer segments or lower frame_stride")
        if not (training and self.hparams.random_start) or span == total:
            return torch.zeros(batch, dtype=torch.long)
        return torch.randint(0, total - span + 1, (batch,), generator=generator)

    def frame_ids(self, starts: Tensor) -> Tensor:
        """(B, frames) frame indices of each sample's window."""
        return starts[:, None] + torch.arange(self.hparams.frames)[None] * self.hparams.frame_stride

    def driving_normals(self, batch: dict, ids: Tensor) -> Tensor:
        """Normal maps (B, T, H, W, 3) uint8 of the window: the precomputed sidecar's when the
        batch carries them (``driving_normals``: ``pipelines.render_normals``, the reader's
        ``normals=``; nothing is rendered in the step), else rendered from the transfer module's
        Δf when it is given (on the CPU, every step), else the shards' own. The path taken is
        logged once."""
        if "driving_normals" in batch:
            self._say("normals", "driving normals: precomputed sidecar (pipelines.render_normals); no "
                                 "rendering in the step")
            maps = batch["driving_normals"]
            return torch.stack([n[i] for n, i in zip(maps, ids.to(maps.device))])
        pair = self._transfer()
        if pair is None:
            return torch.stack([n[i] for n, i in zip(batch["normals"], ids.to(batch["normals"].device))])
        self._say("normals", "driving normals: RENDERED IN THE STEP on the CPU through the transfer module "
                             "(slow at scale: precompute them with python -m pipelines.render_normals and "
                             "give the sidecar folder as data.init_args.normals)")
        head, module = pair
        crop = batch["frames"].shape[-2]
        out = []
        for b in range(ids.shape[0]):
            sm = {k: v[b].detach().float().cpu() for k, v in batch["smplx"].items()}
            sel = {k: (v if k == "betas" else v[ids[b]]) for k, v in sm.items()}
            out.append(transfer_normal_maps(head, module, sel, batch["static_offsets"][b], crop, self.hparams.size))
        return torch.stack(out).to(batch["frames"].device)

    def _say(self, key: str, message: str) -> None:
        """Log ``message`` once (rank 0)."""
        if key not in self._warned:
            self._warned.add(key)
            from lightning.pytorch.utilities import rank_zero_info
            rank_zero_info(message)

    def inputs(self, batch: dict, generator: torch.Generator | None, training: bool) -> dict:
        """Model inputs of a batch: ``video`` (B, 3, F, H, W) in [-1, 1], ``normals`` (same),
        ``reference_image`` (B, 3, H, W), ``reference_normal``, ``latents`` and
        ``reference_latent`` (normalised, fp32)."""
        frames = batch.get("frames")        # absent when only sidecar latents and normals are read
        timeline = frames if frames is not None else batch.get("driving_normals", batch.get("normals"))
        b, total = timeline.shape[:2]
        starts = self.window(total, b, generator, training)
        ids = self.frame_ids(starts)
        moved = torch.zeros(b, dtype=torch.bool)
        if training and self.hparams.p_random_reference > 0:
            if frames is None:
                raise ValueError(f"p_random_reference={self.hparams.p_random_reference} takes references from "
                                 "other frames of a sample, but the batch has no decoded frames (sidecar latents "
                                 "hold windows at frame 0 only): decode 'frames' or set p_random_reference 0")
            moved = torch.rand(b, generator=generator) < self.hparams.p_random_reference
            ids[:, 0] = torch.where(moved, torch.randint(0, total, (b,), generator=generator), ids[:, 0])
        augment = training and (self.hparams.augment_color > 0 or self.hparams.augment_flip
                                or self.hparams.misalign_normals_px > 0)
        t = (self.hparams.frames - 1) // 4 + 1
        use_sidecar = "latents" in batch and self.hparams.frame_stride == 1 and self.hparams.size is None \
            and not starts.any() and not moved.any() and not augment and batch["latents"].shape[2] >= t
        normals = resize_video(unit(self.driving_normals(batch, ids)), self.hparams.size)
        video = None
        if frames is not None:
            video = resize_video(unit(torch.stack([v[i] for v, i in zip(frames, ids.to(frames.device))])),
                                 self.hparams.size)
        elif not use_sidecar:
            raise ValueError("the batch has no frames and no sidecar latents of this window: decode 'frames' "
                             "(data fields) or train on latent sidecars with windows at frame 0, stride 1")
        if augment:
            video, normals = augment_window(video, normals, self.hparams.augment_color, self.hparams.augment_flip,
                                            generator)
            if self.hparams.misalign_normals_px > 0:
                normals = misalign_normals(normals, self.hparams.misalign_normals_px, generator)
        check_video_shape(*normals.shape[2:])
        out = {"normals": normals, "reference_normal": normals[:, :, 0]}
        if video is not None:
            out.update(video=video, reference_image=video[:, :, 0])
        self._say("latents", "latents: precomputed sidecar (pipelines.encode_latents); no VAE in the step"
                  if use_sidecar else "latents: ENCODED IN THE STEP by the frozen codec (precompute them with "
                  "python -m pipelines.encode_latents; windows at frame 0, stride 1, size null)")
        if use_sidecar:
            # the Wan VAE is causal in time: the first k+1 latents code exactly the first 4k+1 frames
            out["latents"] = batch["latents"][:, :, :t].float()
            out["reference_latent"] = batch["reference_latent"][:, :, :t].float()
        else:
            with torch.no_grad():
                out["latents"] = self.codec.encode(video)
                out["reference_latent"] = self.codec.encode_reference(video[:, :, 0], video.shape[2])
        return out

    def _generator(self, offset: int = 0) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(self.hparams.seed * 1_000_003 + (self.global_step + offset) * 101 + self.global_rank)
        return g

    # -- steps ------------------------------------------------------------------------------
    def step_model(self) -> torch.nn.Module:
        """The model the training step calls: with ``compile``, ``torch.compile`` of it, made once
        and kept out of the module tree (so state dicts, checkpoints and the EMA are unchanged)."""
        if not self.hparams.compile:
            return self.model
        made = self.__dict__.get("_compiled")
        if made is None or made[0] is not self.model:
            made = self.__dict__["_compiled"] = (self.model, torch.compile(self.model))
        return made[1]

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        g = self._generator()
        cpu_g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=g, device=self.device)))
        x = self.inputs(batch, cpu_g, training=True)
        b = x["latents"].shape[0]
        keep = condition_keep(b, self.hparams.p_drop_driving, self.hparams.p_drop_reference,
                              self.hparams.p_drop_reference_normal, generator=g, device=self.device)
        conditions = {"reference_latent": x["reference_latent"], "driving_normals": x["normals"],
                      "reference_normal": x["reference_normal"]}
        loss, stats = flow_matching_loss(self.step_model(), x["latents"], conditions, self.hparams.sigma_kind,
                                         self.hparams.shift, keep=keep, generator=g)
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log("train/sigma_mean", stats["sigma_mean"], batch_size=b)
        self.log_reader_skips(batch, b)                    # summed over workers, epochs, ranks
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Flow-matching loss at fixed σ (0.1 .. 0.9) with fixed noise: comparable across epochs."""
        g = torch.Generator(device=self.device).manual_seed(self.hparams.seed + 7 * batch_idx)
        x = self.inputs(batch, None, training=False)
        b = x["latents"].shape[0]
        conditions = {"reference_latent": x["reference_latent"], "driving_normals": x["normals"],
                      "reference_normal": x["reference_normal"]}
        losses = []
        base = residual_base(self.model, conditions)
        clean = x["latents"] if base is None else x["latents"].float() - base
        for s in (0.1, 0.3, 0.5, 0.7, 0.9):
            sigma = torch.full((b,), s, device=self.device)
            x_t, target = noisy_and_target(clean, sigma, generator=g)
            pred = self.model(x_t, timestep_of(sigma), **conditions)
            losses.append(((pred.float() - target) ** 2).mean())
        self.log("val/loss", torch.stack(losses).mean(), prog_bar=True, batch_size=b, sync_dist=True)

    @torch.no_grad()
    def generate(self, x: dict, steps: int | None = None, guidance: float | None = None, seed: int = 0,
                 driving: Tensor | None = None) -> Tensor:
        """A video (B, 3, F, H, W) in [-1, 1] for inputs from :meth:`inputs` (``driving``:
        other normals instead of ``x["normals"]``)."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        return generate_video(self.model, self.codec, x["reference_image"],
                              x["normals"] if driving is None else driving, x["reference_normal"],
                              steps=steps or self.hparams.sample_steps,
                              guidance=self.hparams.guidance if guidance is None else guidance,
                              shift=self.sample_shift, generator=g, reference_latent=x["reference_latent"])

    @property
    def sample_shift(self) -> float:
        """The sampler's σ shift: ``sample_shift``, else the training ``shift``."""
        return sampler_settings(self.hparams)["shift"]

    def global_batch(self) -> int:
        """Samples per optimizer step: per-device batch x devices x nodes x accumulation."""
        trainer = self.trainer
        data = getattr(trainer, "datamodule", None)
        per_device = int(data.hparams.get("batch_size", 1)) if hasattr(data, "hparams") else 1
        return per_device * trainer.world_size * trainer.accumulate_grad_batches

    def configure_optimizers(self):
        params = self.model.trainable_parameters()
        kind = self.hparams.optimizer
        lr = scaled_lr(self.hparams.lr, self.global_batch(), self.hparams.lr_reference_batch, self.hparams.lr_scaling)
        self.effective_lr = lr
        if kind == "adamw":
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=self.hparams.weight_decay, betas=(0.9, 0.99))
        elif kind == "cpu_adam":                    # DeepSpeed's, for ZeRO-Offload of the optimizer
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            opt = DeepSpeedCPUAdam(params, lr=lr, weight_decay=self.hparams.weight_decay,
                                   betas=(0.9, 0.99), adamw_mode=True)
        elif kind == "fused_adam":                  # DeepSpeed's fused CUDA Adam
            from deepspeed.ops.adam import FusedAdam
            opt = FusedAdam(params, lr=lr, weight_decay=self.hparams.weight_decay, betas=(0.9, 0.99),
                            adam_w_mode=True)
        else:
            raise ValueError(f"unknown optimizer {kind!r}; known: adamw, cpu_adam, fused_adam")
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = min(self.hparams.warmup_steps, total // 2)
        floor = self.hparams.min_lr_ratio

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- export -----------------------------------------------------------------------------
    def export_module(self) -> NormalDrivenWan:
        """The module that is exported (``save_pretrained`` folder) with the EMA weights."""
        return self.model


# -- the tiny codec -----------------------------------------------------------------------------
def train_codec(shards: str, out: str | Path, steps: int = 600, batch_size: int = 4, frames: int = 5,
                frame_stride: int = 1, lr: float = 1e-3, base_dim: int = 16, kl_weight: float = 1e-4,
                stat_batches: int = 8, seed: int = 0, log_every: int = 50, sample_posterior: bool = False,
                flip: bool = True, clip_grad: float | None = None, size: int | None = None,
                kind: str = "wan_vae", spatial: int = 2) -> dict:
    """Train the tiny Wan VAE on the training shards of ``shards`` (random windows of
    ``frames`` frames every ``frame_stride``, mirrored at random with ``flip``), set its
    per-channel latent mean/std, save it to ``out`` (diffusers folder:
    ``LatentCodec.from_pretrained(out)``). Returns a summary.

    ``sample_posterior=False`` (default) reconstructs from the posterior mean, the latent the
    generator is trained on (``LatentCodec.encode``); the small KL term keeps the latents near
    N(0, 1). ``size``: frames resized to this side first (the generator task's ``size``)."""
    from training.data.shards import ShardDataset, collate, shard_urls
    torch.manual_seed(seed)
    if kind == "space_to_depth":
        steps = 0                                   # nothing to learn: only the latent statistics
        codec = LatentCodec.space_to_depth(spatial)
    elif kind == "wan_vae":
        codec = LatentCodec.tiny(seed=seed, base_dim=base_dim)
    else:
        raise ValueError(f"unknown codec kind {kind!r}; known: space_to_depth, wan_vae")
    vae = codec.vae.train()
    urls = shard_urls(shards, "train")
    ds = ShardDataset(urls, max(steps, stat_batches) * batch_size, resampled=True, shuffle_buffer=32, seed=seed,
                      rank=0, world_size=1, fields=("frames",))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=collate)
    g = torch.Generator().manual_seed(seed)
    span = (frames - 1) * frame_stride + 1
    t0, history = time.perf_counter(), []

    def clip(batch: dict) -> Tensor:
        v = batch["frames"]
        starts = torch.randint(0, v.shape[1] - span + 1, (v.shape[0],), generator=g)
        ids = starts[:, None] + torch.arange(frames)[None] * frame_stride
        video = resize_video(unit(torch.stack([x[i] for x, i in zip(v, ids)])), size)
        if flip:
            mirror = torch.rand(video.shape[0], generator=g) < 0.5
            video[mirror] = video[mirror].flip(-1)
        return video

    if steps > 0:
        opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    for step, batch in enumerate(loader if steps > 0 else []):
        loss, stats = vae_loss(vae, clip(batch), kl_weight, sample=sample_posterior)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(vae.parameters(), clip_grad)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            psnr = float(psnr_from_mse(stats["mse"].detach(), data_range=2.0))      # [-1, 1] video
            history.append({"step": step, "loss": float(loss), "psnr_db": psnr})
            print(f"[codec] step {step} loss {float(loss):.4f} psnr {psnr:.2f} dB "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    vae.eval()
    zs, mse = [], []
    with torch.no_grad():
        for k, batch in enumerate(loader):
            if k >= stat_batches:
                break
            video = clip(batch)
            zs.append(vae.encode(video).latent_dist.mode().float())
            mse.append(float(((vae.decode(zs[-1]).sample.float() - video) ** 2).mean()))
    z = torch.cat(zs).transpose(0, 1).reshape(zs[0].shape[1], -1)
    codec.set_latent_stats(z.mean(1), z.std(1).clamp(min=1e-3))
    if not history:                               # the fixed codec: its (lossless) reconstruction
        m = sum(mse) / len(mse)
        history.append({"step": 0, "loss": m, "psnr_db": float(psnr_from_mse(m, data_range=2.0))})
    out = Path(out)
    codec.save_pretrained(out)
    summary = {"codec": str(out), "kind": kind, "steps": steps, "seconds": time.perf_counter() - t0,
               "params": sum(p.numel() for p in vae.parameters()), "history": history}
    (out / "training.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train the tiny codec (for flavors tiny_z16 / tiny_z48) on shards.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("codec", help="train the tiny codec")
    c.add_argument("--shards", required=True, help="a preprocessing output (or truth shards) folder")
    c.add_argument("--out", required=True)
    c.add_argument("--steps", type=int, default=600)
    c.add_argument("--batch-size", type=int, default=4)
    c.add_argument("--frames", type=int, default=5)
    c.add_argument("--frame-stride", type=int, default=1)
    c.add_argument("--lr", type=float, default=1e-3)
    c.add_argument("--base-dim", type=int, default=16)
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--size", type=int, default=None, help="resize frames to this side (the generator's size)")
    c.add_argument("--kind", default="wan_vae", choices=["space_to_depth", "wan_vae"],
                   help="space_to_depth: the lossless fixed codec (only its latent statistics are measured; "
                        "--steps, --lr, --base-dim unused); wan_vae: train a tiny AutoencoderKLWan")
    c.add_argument("--spatial", type=int, default=2, help="space_to_depth: the spatial factor")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    summary = train_codec(args.shards, args.out, args.steps, args.batch_size, args.frames, args.frame_stride,
                          args.lr, args.base_dim, seed=args.seed, size=args.size, kind=args.kind,
                          spatial=args.spatial)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"} | {"last": summary["history"][-1]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
