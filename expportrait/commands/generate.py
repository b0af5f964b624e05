"""`expportrait generate`: reference image + normal-map video -> mp4, with the trained generator.

    expportrait generate --weights EXPORT_DIR --codec CODEC_DIR --reference IMAGE
        --normals NORMALS.mp4 --out OUT.mp4 [--reference-normal IMAGE] [--size 64] [--window 5]
        [--overlap 1] [--steps N] [--guidance 1.0] [--seed 0] [--max-frames N] [--side-by-side]
    expportrait generate --checkpoint CKPT ...        # a training checkpoint (file or DeepSpeed folder)

Weights: ``--weights`` is a ``NormalDrivenWan.save_pretrained`` folder (the EMA export of a
run, ``OUT/export/ema``) or a package folder holding ``generator/`` and ``codec/``;
``--checkpoint`` rebuilds the run's task from its hyperparameters and takes the EMA weights
(``--no-ema``: the live ones). The codec is ``--codec``, else the package's ``codec/``, else
the checkpoint's ``codec`` hyperparameter. The normal-map video (view-convention RGB, as
``expportrait transfer`` writes ``normals.mp4``) is resized to ``--size``² and cut into
overlapping windows of ``--window`` = 4k+1 frames, cross-faded (expportrait/reenactment.py);
the reference normal defaults to the first normal frame. A progress bar counts windows.
Writes OUT.mp4 (and ``OUT_side_by_side.mp4``: reference | normals | generated, with
``--side-by-side``).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from preprocessing.errors import (
    finite_float,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="reference image + normal-map video -> mp4 with the generator")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", type=Path, help="exported generator folder (or a package with generator/, codec/)")
    src.add_argument("--checkpoint", type=Path, help="training checkpoint: a .ckpt file or a DeepSpeed folder")
    p.add_argument("--codec", type=Path, default=None, help="AutoencoderKLWan folder (default: package / checkpoint's)")
    p.add_argument("--codec-subfolder", default=None, help="e.g. vae for a Wan Diffusers folder")
    p.add_argument("--no-ema", action="store_true", help="with --checkpoint: the live weights, not the EMA")
    p.add_argument("--reference", type=Path, required=True, help="reference image (png/jpg)")
    p.add_argument("--normals", type=Path, required=True, help="normal-map video (mp4)")
    p.add_argument("--reference-normal", type=Path, default=None,
                   help="reference normal map (default: first normal frame)")
    p.add_argument("--out", type=Path, required=True, help="output mp4")
    p.add_argument("--size", type=positive_int, default=64, help="generated frame size (a multiple of 16)")
    p.add_argument("--window", type=positive_int, default=5, help="frames per generator window (4k+1)")
    p.add_argument("--overlap", type=nonnegative_int, default=1, help="frames shared by consecutive windows")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="sampler steps (default: the checkpoint's, else 20)")
    p.add_argument("--guidance", type=finite_float, default=1.0)
    p.add_argument("--shift", type=positive_float, default=None,
                   help="sampler shift (default: the checkpoint's sample_shift, else its shift, else 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-frames", type=nonnegative_int, default=0, help="normal frames to use (0: all)")
    p.add_argument("--fps", type=nonnegative_float, default=0.0, help="output fps (0: the normal video's)")
    p.add_argument("--side-by-side", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


# -- loading ------------------------------------------------------------------------------------
def load_generator(weights: Path | None, checkpoint: Path | None, codec: Path | None, codec_subfolder: str | None,
                   use_ema: bool = True):
    """(NormalDrivenWan, LatentCodec, settings) from an export/package folder or a checkpoint."""

    from expportrait.reenactment import PACKAGE_FILE, read_package_meta
    from models.generator import LatentCodec, NormalDrivenWan
    settings: dict = {}
    if weights is not None:
        if not weights.is_dir():
            raise FileNotFoundError(f"generator weights folder {weights} does not exist")
        folder = weights / "generator" if (weights / "generator").is_dir() else weights
        model = NormalDrivenWan.from_pretrained(folder)
        if codec is None and (weights / "codec").is_dir():
            codec = weights / "codec"
        if (weights / PACKAGE_FILE).is_file():                # a package: its sampler settings
            inference = read_package_meta(weights).get("inference", {})
            settings = {k: inference.get(k) for k in ("shift", "steps")}
    else:
        from training.export import task_from_checkpoint
        from training.tasks.generator import GeneratorTask, sampler_settings
        if not checkpoint.exists():
            raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
        task, hp = task_from_checkpoint(checkpoint, use_ema, {"pretrained": None, "wan_folder": None},
                                        default_class="training.tasks.generator.GeneratorTask")
        if not isinstance(task, GeneratorTask) or "flavor" not in hp:
            raise ValueError(f"{checkpoint} is not a generator checkpoint (no generator hyperparameters)")
        model = task.model
        settings = {**sampler_settings(hp), "codec": hp.get("codec"), "codec_subfolder": hp.get("codec_subfolder")}
        if codec is None and hp.get("codec"):
            codec, codec_subfolder = Path(hp["codec"]), codec_subfolder or hp.get("codec_subfolder")
    if codec is None:
        raise ValueError("no codec: give --codec (the AutoencoderKLWan folder the generator was trained with)")
    return model.eval(), LatentCodec.from_pretrained(codec, codec_subfolder).eval(), settings


def read_video(path: Path, max_frames: int = 0) -> tuple[np.ndarray, float]:
    """(T, H, W, 3) uint8 and fps of a video file."""
    import av
    if not path.is_file():
        raise FileNotFoundError(f"normal-map video {path} does not exist")
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or 25)
            frames = []
            for frame in container.decode(video=0):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames and len(frames) >= max_frames:
                    break
    except (av.error.FFmpegError, IndexError) as err:
        raise ValueError(f"{path} is not a readable video ({err})") from err
    if not frames:
        raise ValueError(f"{path} holds no frame")
    return np.stack(frames), fps


def read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        return np.asarray(Image.open(path).convert("RGB"))
    except UnidentifiedImageError as err:
        raise ValueError(f"{path} is not a readable image") from err


def _video(frames: np.ndarray, size: int):
    """(T, H, W, 3) uint8 -> (1, 3, T, size, size) in [-1, 1]: the training task's frame transform."""
    import torch

    from models.generator.frames import generator_video
    return generator_video(torch.from_numpy(np.array(frames, copy=True))[None], size)


# -- the command --------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    import torch
    from tqdm.auto import tqdm

    from expportrait.reenactment import generate_windows, window_starts
    from models.generator import check_video_shape, generate_video
    from preprocessing.errors import writable_file
    from preprocessing.video import write_video
    check_video_shape(args.window, args.size, args.size)
    writable_file(args.out, "--out")                         # before the model loads
    if not 0 <= args.overlap < args.window:
        raise ValueError(f"--overlap {args.overlap} must be in [0, --window {args.window})")
    t0 = time.perf_counter()
    reference = read_image(args.reference)[None]
    normals, fps = read_video(args.normals, args.max_frames)
    ref_normal = (read_image(args.reference_normal) if args.reference_normal else normals[0])[None]
    model, codec, settings = load_generator(args.weights, args.checkpoint, args.codec, args.codec_subfolder,
                                            use_ema=not args.no_ema)
    shift = args.shift if args.shift is not None else (settings.get("shift") or 5.0)
    steps = args.steps or settings.get("steps") or 20
    t = len(normals)
    padded = normals if t >= args.window else np.concatenate([normals, np.repeat(normals[-1:], args.window - t, 0)])
    ref_img, ref_nrm = _video(reference, args.size)[:, :, 0], _video(ref_normal, args.size)[:, :, 0]
    ref_latent = codec.encode_reference(ref_img, args.window)
    starts = window_starts(len(padded), args.window, args.overlap)
    bar = tqdm(total=len(starts), desc="generate", unit="window", disable=args.no_progress)

    def window(start: int) -> np.ndarray:
        drive = _video(padded[start:start + args.window], args.size)
        g = torch.Generator().manual_seed(args.seed)            # the same noise in every window
        video = generate_video(model, codec, ref_img, drive, ref_nrm, steps=steps, guidance=args.guidance,
                               shift=shift, generator=g, reference_latent=ref_latent)[0]
        bar.update(1)
        return video.add(1).mul(127.5).permute(1, 2, 3, 0).numpy()

    t1 = time.perf_counter()
    frames = generate_windows(window, len(padded), args.window, args.overlap)[:t]
    bar.close()
    seconds = time.perf_counter() - t1
    frames = np.clip(np.rint(frames), 0, 255).astype(np.uint8)
    out_fps = args.fps or fps
    out = write_video(args.out, frames, out_fps)
    result = {"out": str(out), "frames": int(t), "size": args.size, "windows": len(starts), "steps": steps,
              "fps": out_fps, "seconds_per_frame": round(seconds / max(t, 1), 4),
              "seconds": round(time.perf_counter() - t0, 2)}
    if args.side_by_side:
        side = np.concatenate([np.repeat(reference, t, 0), normals, frames], axis=2)
        side_path = args.out.with_name(args.out.stem + "_side_by_side.mp4")
        result["side_by_side"] = str(write_video(side_path, side, out_fps))
    return result
