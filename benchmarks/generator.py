"""The tiny generator of a recipe (default ``tiny_cpu``: flavor ``tiny_z48`` on the lossless
space-to-depth codec, 5-frame windows every 4th frame at 32²) trained on a synthetic corpus,
evaluated on held-out identities: driven by the true head's normals, by normals built from the
fitter's parameters as ``expportrait reenact`` builds them, and across identities against the
exact cross ground truth the world renders.

    python benchmarks/generator.py [--recipe tiny_cpu] [--work outputs/bench/generator] [--identities 48
        --clips 2 --frames 48] [--codec-steps 2000 | --codec-dir DIR] [--train-steps 5800 --train-minutes 19]
        [--train-threads N] [--sample-steps N --sample-shift S --guidance G] [--eval-split test|val] [--reuse]
        [--transfer-epochs 12 | --transfer-dir DIR] [--fit-size 128] [--cross-starts 0,16] [--no-fitted]
        [--train-normals exact|fitted] [--no-compile] [--no-motion] [--ablation] [--ship DIR]
        (experiments off the recipe: [--flavor F --codec-kind K --window W --stride S --size N])

1. A synthetic corpus split by identity (train / val / test) and its exact-truth shards
   (``training.data.truth_shards``: frames + the true head's normal maps, one sample per clip).
2. The codec: by default the lossless ``SpaceToDepthVAE`` (only its latent statistics are
   measured on the *training* shards); ``--codec-kind wan_vae`` trains a tiny
   ``AutoencoderKLWan`` there first (``python -m training.tasks.generator codec``), timed
   separately (``codec_minutes``).
3. The generator through the platform's CLI (``python -m training.train fit`` with the recipe's
   generator config and overrides, ``Recipe.train_args``), capped at
   ``--train-minutes`` (Lightning's ``max_time``), its step compiled (``GeneratorTask.compile``;
   ``--no-compile``: eager); the EMA export is what is evaluated. Driving
   normals in training: the shards' own — the exact head's, or with ``--train-normals fitted``
   the fitter's head of each train/val clip (fitted as step 5 fits its drivers; the job's shards
   carry the fitter's parameters and normals: ``make_fitted_shards``; its figures go to
   ``benchmarks/results/generator_fitted.json``, not the headline's).
4. On the *test* identities (never read in training; ``--eval-split val`` for choosing sampler
   settings), every window of ``--window`` frames every ``--stride`` frames at a few start
   frames: PSNR and SSIM (models.metrics: per frame, averaged, as `evaluate`) of frames 1.. against the ground
   truth for
   - ``model``: the generator from the reference frame (frame 0) and the window's normals,
     sampled as the trained task samples (its ``sample_steps``, ``sample_shift``) unless given;
   - ``copy``: the reference frame repeated;
   - ``shuffled``: the generator driven by another test clip's normals (another identity);
   - ``codec``: the ground truth through the codec (encode + decode): the ceiling of any
     generator on this codec.
5. **The fitted path** (``*_fitted``; ``--no-fitted`` skips it): the same windows driven by
   normals built as ``expportrait reenact`` builds them. Each test clip is rendered again by the
   world at ``--fit-size`` (the recipe's crop size: the fitter cannot track a 32² face; the same
   scene and cameras), written as the world writes its clips (H.264), decoded and fitted whole by
   the preprocessing job's stages of the recipe (``expportrait.reenactment.fitted_subject``:
   ``preprocessing.clip_stages.fit_clip`` with a ``StageContext``, as inference fits a raw video),
   and each window's reference frame fitted alone as ``reenact`` fits a source image; both fits
   seen in the whole frame at the generator's size (``in_full_frame``: the crop cameras moved
   back, so the normals line up with the 32² frames); driving normals =
   ``Reenactor.driving_normals`` (expression through the frozen transfer module, head pose
   retargeted, rendered by ``models.generator.frames.generator_normal_maps``). The transfer
   module: ``configs/train/transfer_tiny.yaml`` trained as the demo trains it (its epochs) on the
   exact-truth shards' *train* identities, or ``--transfer-dir``.
6. **Cross pairs** of held-out identities: for each test driver clip of the world's
   ``pairs.parquet``, its first test target; source = the target's clip 0, frame 0; driven frames
   = the windows at ``--cross-starts`` chained (frames 4..32 every 4th by default). Ground truth:
   ``preprocessing.synthetic.world.driven_clip`` (the target identity with the driver's
   expression and its head and camera motion since frame 0 on the target's frame-0 pose, its own
   Δg and the Δf the world gives it for the driver's expression). Driven by the exact normals of
   that head and by fitted normals (the driver's whole fit retargeted onto the source image's
   fit). PSNR against the cross truth (model and copy); head-pose (APD, degrees) and expression
   (AED) errors by the fitter as ``expportrait evaluate`` measures them
   (``expportrait.evaluation.motion``: fit_motion + expression_pose_distance) against the
   driver's frames (``cross_*_ratio``: model / still reference) and against the cross truth
   (``*_gt``); ``cross_apd_deg_truth``: the cross truth's own APD to the driver (what a perfect
   model scores against the driver: the source's reference pose differs from the driver's).
   Each pair's videos start with the source reference (the driver's: its frame 0), so **APD
   motion** (``expportrait.evaluation.motion``: the head's rotation since the first frame, what
   retargeting transfers) is measured beside APD: ``cross_apd_motion_ratio`` (model / still
   reference). The same figures from the world's exact parameters (``exact_motion_errors``, no
   fitter): ``cross_apd_ratio_exact_truth`` — the exact answer's APD to the driver / the still
   reference's, the floor of ``cross_apd_ratio`` for any model that retargets motion — and
   ``cross_apd_motion_ratio_exact_truth``.
7. ``--ablation``: the same recipe trained a second time on shards whose normal maps are the
   3DMM head's alone (Δg = Δf = 0: ``write_truth_shards(personalized_normals=False)``) and
   evaluated on the same held-out windows and cross pairs with 3DMM-only normals:
   ``personalized_gain_db`` = PSNR(personalized) − PSNR(3DMM-only) on the self windows,
   ``personalized_aed_ratio`` = AED(personalized) / AED(3DMM-only) on the cross pairs (against the
   driver; ``_gt``: against the cross truth), as measured whatever their sign.
8. ``--ship DIR``: the trained generator (fp16) and its codec written as a starting point with
   ``provenance.json`` (the command, commit, world, train identities, its held-out figures).
   ``training/pretrained/tiny_cpu`` (what ``expportrait demo`` fine-tunes from) is made by
   ``python benchmarks/generator.py --seed 1 --work outputs/bench/generator_ship --no-fitted
   --train-steps 4500 --train-minutes 60 --reuse --ship training/pretrained/tiny_cpu``: a seed-1 world,
   whose identities are not the demo's (seed 0), trained to a step count rather than the
   headline's 19-minute cap; its figures go to ``benchmarks/results/generator_ship.json``, not
   the headline's.

Last line one JSON object: ``psnr_gain_db`` (model − copy, target ≥ 3), ``shuffled_drop_db``
(model − shuffled, target ≥ 2), ``psnr_gain_db_fitted`` (≥ 2), ``cross_psnr_gain_db`` (≥ 2),
``cross_apd_ratio`` (≤ 0.6), ``cross_apd_motion_ratio``, ``cross_aed_ratio``, ``train_minutes`` (≤ 20;
with ``--reuse``, of the reused training, read from its MLflow run), the ablation's keys,
``train_samples_per_s``, ``sample_seconds_per_frame``, the load average of the host during the
run, ...
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def log(msg: str) -> None:
    print(f"[generator-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load() -> float:
    return os.getloadavg()[0]


# -- data -------------------------------------------------------------------------------------
def make_corpus(work: Path, args) -> Path:
    from _report import synthetic_corpus
    return synthetic_corpus(work, args.identities, args.clips, args.frames, args.size, args.seed,
                            stale=("shards", "codec", "train", "transfer", "fit_videos", "fit_cache", "shards_3dmm",
                                   "train_3dmm", "shards_fitted"),
                            log=log)


def make_shards(work: Path, corpus: Path, segment: int, personalized: bool = True) -> Path:
    """The exact-truth shards (``personalized``: normal maps of B + Δg + Δf, else of the 3DMM head
    alone, in ``shards_3dmm``)."""
    from training.data.shards import shard_urls
    from training.data.truth_shards import write_truth_shards
    out = work / ("shards" if personalized else "shards_3dmm")
    if not shard_urls(out):                           # finished shards (done markers): a rerun reuses them
        t0 = time.perf_counter()
        counts = write_truth_shards(corpus, out, segment_frames=segment, clips_per_shard=2,
                                    personalized_normals=personalized)
        log(f"truth shards ({'personalized' if personalized else '3DMM-only'} normals) {counts} in "
            f"{time.perf_counter() - t0:.0f} s")
    return out


def job_stages(args, corpus: Path):
    """The recipe's preprocessing stages (the job's fitter) on the corpus's head model."""
    from models.head.resolve import synthetic_model_file
    from preprocessing.clip_stages import StageContext
    subdivision = json.loads((corpus / "world.json").read_text())["config"]["subdivision"]
    return StageContext(synthetic_model_file(0), args.recipe_obj.preprocess_config().stages, subdivision,
                        fit_threads=1)


def make_fitted_shards(work: Path, corpus: Path, world, stages, args) -> Path:
    """``--train-normals fitted``: shards of the train and val clips carrying the fitter's
    parameters and the normal maps of its head instead of the truth's, as the preprocessing job's
    shards do (``write_truth_shards(fitted=)``; the frames are the clips'): each clip rendered at
    ``--fit-size`` and fitted whole on the job's path (:func:`fit_videos`, :func:`fit_subjects`, as
    the fitted path's drivers), seen in its whole frames at the generator's size. Clips the fitter
    fails on are left out."""
    import pandas as pd

    from training.data.shards import shard_urls
    from training.data.truth_shards import write_truth_shards
    out = work / "shards_fitted"
    if shard_urls(out):
        return out
    manifest = pd.read_parquet(corpus / "manifest.parquet")
    clips = sorted(manifest.loc[manifest.split.isin(["train", "val"]), "clip_id"])
    fit_size = args.fit_size or stages.config.crop_size
    log(f"fitting {len(clips)} train/val clips at {fit_size}² for the fitted-normal shards")
    videos = fit_videos(work, corpus, world, clips, fit_size)
    drivers, _, failures, seconds = fit_subjects(videos, stages, {}, args.size, work / "fit_cache", args.reuse)
    counts = write_truth_shards(corpus, out, segment_frames=args.frames, clips_per_shard=2, splits=("train", "val"),
                                fitted={clip: subject.clip for clip, subject in drivers.items()})
    log(f"fitted-normal shards {counts}: fits {seconds / 60:.1f} min, failures (left out): {failures or 'none'}")
    return out


def run(cmd: list[str], what: str, threads: int) -> float:
    """Run a command from the repo root with ``threads`` torch/OpenMP threads; its wall time in
    minutes (process start included)."""
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    minutes = (time.perf_counter() - t0) / 60
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed ({r.returncode}): {r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return minutes


def train_codec(work: Path, shards: Path, args) -> tuple[Path, float | None]:
    if args.codec_dir:                         # a codec trained earlier on these shards' train split
        out = Path(args.codec_dir)
        summary = json.loads((out / "training.json").read_text())
        log(f"codec: using {out} ({summary['steps']} steps, {summary['seconds'] / 60:.1f} min when trained)")
        return out, summary["seconds"] / 60
    out = work / "codec"
    if args.reuse and (out / "training.json").is_file():
        log(f"codec: reusing {out}")
        return out, None
    shutil.rmtree(out, ignore_errors=True)
    minutes = run([sys.executable, "-m", "training.tasks.generator", "codec", "--shards", str(shards), "--out",
                   str(out), "--steps", str(args.codec_steps), "--frames", str(args.window), "--frame-stride",
                   str(args.stride), "--base-dim", str(args.codec_dim), "--lr", str(args.codec_lr),
                   "--kind", args.codec_kind], "codec training", args.train_threads)
    summary = json.loads((out / "training.json").read_text())
    log(f"codec ({args.codec_kind}): {summary['steps']} steps in {minutes:.1f} min, last train-batch PSNR "
        f"{summary['history'][-1]['psnr_db']:.1f} dB")
    return out, minutes


def off_recipe_args(args) -> list[str]:
    """LightningCLI overrides for what the command line changes from the recipe."""
    out = []
    for flag, key in (("flavor", "flavor"), ("window", "frames"), ("stride", "frame_stride"), ("size", "size")):
        if getattr(args, f"given_{flag}"):
            out += [f"--model.init_args.{key}", str(getattr(args, flag))]
    return out


def train_generator(work: Path, shards: Path, codec: Path, args, name: str = "train") -> tuple[Path, float | None, int]:
    out = work / name
    export = out / "export" / "ema"
    if args.reuse and (export / "generator.json").is_file():
        minutes, steps, batch = recorded_training(out)
        log(f"generator: reusing {export} (its training: {steps} steps of {batch} samples in {minutes} min by its "
            f"MLflow run)")
        return export, minutes, steps * batch
    shutil.rmtree(out, ignore_errors=True)
    cap = int(args.train_minutes * 60)
    cmd = [sys.executable, "-m", "training.train", "fit", *args.recipe_obj.train_args("generator"),
           "--out", str(out), "--data.init_args.root", str(shards), "--model.init_args.codec", str(codec),
           *off_recipe_args(args), "--model.init_args.compile", str(args.compile).lower(),
           "--trainer.max_steps", str(args.train_steps),
           "--trainer.max_time", f"00:00:{cap // 60:02d}:{cap % 60:02d}",
           "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.run_name",
           f"dit_{args.recipe}_bench" + name[len("train"):], *args.train_arg]
    minutes = run(cmd, "generator training", args.train_threads)
    _, steps, batch = recorded_training(out)
    log(f"generator: {steps} steps of {batch} samples in {minutes:.1f} min (incl. process start) -> {export}")
    return export, minutes, steps * batch


def recorded_training(run_dir: Path) -> tuple[float | None, int, int]:
    """(minutes, steps, batch size) of a finished training in ``run_dir`` read back from its
    records: the MLflow run's start and end time (without process start and export; None when
    the store has none), :func:`trained_steps` and the last checkpoint's batch size (loaded
    ``weights_only``: the one loader). ``--reuse`` reports these for a training it did not run."""
    import sqlite3

    from training.export import load_checkpoint_state
    ckpt = load_checkpoint_state(run_dir / "checkpoints" / "last.ckpt")
    steps = trained_steps(run_dir, int(ckpt["global_step"]))
    try:
        with sqlite3.connect(f"file:{run_dir / 'mlflow.db'}?mode=ro", uri=True) as db:
            start, end = db.execute("select min(start_time), max(end_time) from runs").fetchone()
    except sqlite3.Error:
        start = end = None
    minutes = round((end - start) / 60000, 2) if start and end else None
    return minutes, steps, int(ckpt["datamodule_hyper_parameters"]["batch_size"])


def train_transfer(work: Path, shards: Path, args) -> tuple[Path, float | None, str]:
    """The frozen transfer module of the fitted path: ``--transfer-dir``, else the recipe's transfer
    config trained as the demo trains it (``--transfer-epochs``) on the exact-truth shards' train
    split; (export folder, minutes or None, what it is)."""
    if args.transfer_dir:
        return Path(args.transfer_dir), None, f"given: {args.transfer_dir}"
    out = work / "transfer"
    export = out / "export" / "ema"
    what = (f"{args.recipe} recipe's transfer config ({args.recipe_obj.transfer.config}), {args.transfer_epochs} "
            f"epochs (the demo's), trained here on the exact-truth shards of the train identities")
    if args.reuse and (export / "config.json").is_file():
        log(f"transfer module: reusing {export}")
        return export, None, what
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "training.train", "fit", *args.recipe_obj.train_args("transfer"), "--out", str(out),
           "--data.init_args.root", str(shards), "--trainer.max_epochs", str(args.transfer_epochs),
           "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.run_name",
           f"transfer_{args.recipe}_bench"]
    minutes = run(cmd, "transfer training", args.train_threads)
    log(f"transfer module: {args.transfer_epochs} epochs in {minutes:.1f} min -> {export}")
    return export, minutes, what


def trained_steps(run_dir: Path, checkpoint_step: int) -> int:
    """Optimizer steps the run took: the last step its learning-rate monitor logged to the run's
    MLflow store, + 1 (the last checkpoint is written every 250 steps, so its ``global_step``
    can trail the end of training); the checkpoint's step when the store has none."""
    import sqlite3
    try:
        with sqlite3.connect(f"file:{run_dir / 'mlflow.db'}?mode=ro", uri=True) as db:
            last = db.execute("select max(step) from metrics where key like 'lr-%'").fetchone()[0]
    except sqlite3.Error:
        last = None
    return max(checkpoint_step, last + 1) if last is not None else checkpoint_step


# -- evaluation -------------------------------------------------------------------------------
def test_samples(shards: Path, split: str = "test") -> dict[str, dict]:
    """Every ``split`` sample by clip id: ``identity``, ``frames`` and ``normals`` uint8 (T, H, W, 3)."""
    from training.data.shards import ShardDataset, shard_urls
    urls = shard_urls(shards, split)
    total = sum(json.loads(Path(u).with_name(Path(u).stem + ".done.json").read_text())["samples"] for u in urls)
    ds = ShardDataset(urls, total, resampled=False, rank=0, world_size=1, fields=("frames", "normals"))
    return {s["key"].rsplit("_s", 1)[0]: {"identity": s["identity_id"], "frames": s["frames"], "normals": s["normals"]}
            for s in ds}


def test_windows(shards: Path, window: int, stride: int, starts: list[int], split: str = "test",
                 samples: dict | None = None) -> list[dict]:
    """Every ``split`` sample's windows: frames and normals (3, F, H, W) in [-1, 1], clip id,
    identity, start frame."""
    import torch

    from training.tasks.generator import unit
    out, span = [], (window - 1) * stride + 1
    for clip, s in (samples if samples is not None else test_samples(shards, split)).items():
        for start in starts:
            if start + span > s["frames"].shape[0]:
                continue
            ids = torch.arange(window) * stride + start
            out.append({"clip": clip, "identity": s["identity"], "start": start,
                        "video": unit(s["frames"][ids][None])[0], "normals": unit(s["normals"][ids][None])[0]})
    return out


@dataclass
class Sampler:
    """The trained generator and codec, sampled as the trained task samples; batches of ``batch``
    windows, the noise of batch k drawn from ``seed + k * batch`` (every path gets the same noise)."""

    model: object
    codec: object
    steps: int
    shift: float
    guidance: float
    seed: int
    batch: int = 8
    seconds: float = 0.0
    frames: int = 0

    @classmethod
    def load(cls, export: Path, codec_dir: Path, **settings) -> "Sampler":
        from models.generator import LatentCodec, NormalDrivenWan
        return cls(NormalDrivenWan.from_pretrained(export).eval(), LatentCodec.from_pretrained(codec_dir).eval(),
                   **settings)

    def __call__(self, reference, normals, reference_normal=None):
        """Videos (N, 3, F, H, W) from reference images (N, 3, H, W), driving normals (N, 3, F, H, W)
        (frame 0: the reference's) and the reference normals (None: the normals' frame 0)."""
        import torch

        from models.generator import generate_video
        reference_normal = normals[:, :, 0] if reference_normal is None else reference_normal
        out = []
        for b0 in range(0, len(normals), self.batch):
            sel = slice(b0, b0 + self.batch)
            g = torch.Generator().manual_seed(self.seed + b0)
            t0 = time.perf_counter()
            gen = generate_video(self.model, self.codec, reference[sel], normals[sel], reference_normal[sel],
                                 steps=self.steps, generator=g, shift=self.shift, guidance=self.guidance)
            self.seconds += time.perf_counter() - t0
            self.frames += gen.shape[0] * gen.shape[2]
            out.append(gen)
        return torch.cat(out)


def window_scores(pred, truth) -> dict[str, list[float]]:
    """PSNR and SSIM (models.metrics, as `evaluate` reports them) of frames 1.. of each window
    (N, 3, F, H, W), as a batch of images per window."""
    from models.metrics import SIGNED, psnr, ssim
    out = {"psnr": [], "ssim": []}
    for p, t in zip(pred, truth):
        p1, t1 = p[:, 1:].transpose(0, 1), t[:, 1:].transpose(0, 1)
        out["psnr"].append(psnr(p1, t1, SIGNED))
        out["ssim"].append(ssim(p1, t1, SIGNED))
    return out


def mean(values) -> float:
    values = [v for v in values if v == v]
    return sum(values) / len(values) if values else float("nan")


def evaluate(sampler: Sampler, windows: list[dict]) -> dict:
    """Self reenactment with the windows' own (exact) normals: model, copy, shuffled, codec."""
    import torch

    n = len(windows)
    # shuffled: each window driven by the normals of a window of another identity (a fixed derangement)
    if len({w["identity"] for w in windows}) < 2:
        raise ValueError("the shuffled-normals baseline needs >= 2 test identities (use more --identities)")
    others = [next(j for k in range(1, n) for j in [(i + k * 7) % n]
                   if windows[j]["identity"] != windows[i]["identity"]) for i in range(n)]
    video = torch.stack([w["video"] for w in windows])
    normals = torch.stack([w["normals"] for w in windows])
    ref = video[:, :, 0]
    gen = sampler(ref, normals)
    shuffled = sampler(ref, normals[others], normals[:, :, 0])
    with torch.no_grad():
        recon = torch.cat([sampler.codec.decode(sampler.codec.encode(video[b:b + 8])) for b in range(0, n, 8)])
    scores = {"model": window_scores(gen, video), "shuffled": window_scores(shuffled, video),
              "copy": window_scores(ref[:, :, None].expand_as(video), video), "codec": window_scores(recon, video)}
    return {"windows": n, "identities": sorted({w["identity"] for w in windows}),
            "psnr_db": {k: mean(v["psnr"]) for k, v in scores.items()},
            "ssim": {k: mean(v["ssim"]) for k, v in scores.items()},
            "per_window_psnr": scores["model"]["psnr"], "generated": gen}


# -- the fitted path and cross pairs ----------------------------------------------------------
def fit_videos(work: Path, corpus: Path, world, clip_ids: list[str], size: int) -> dict[str, Path]:
    """Each clip rendered again by the world at ``size`` (the clip driving itself: the same scene,
    cameras resized), written as the world writes its clips (H.264, its crf and pixel format)."""
    from preprocessing.synthetic.world import driven_clip
    from preprocessing.video import write_video
    config = json.loads((corpus / "world.json").read_text())["config"]
    out = work / "fit_videos"
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for clip in clip_ids:
        path = out / f"{clip}_{size}.mp4"
        if not path.is_file():
            tmp = out / f"{clip}_{size}.partial.mp4"
            write_video(tmp, driven_clip(world, corpus, clip, clip, size=size).frames, config["fps"],
                        crf=config["crf"], pix_fmt=config["pix_fmt"])
            tmp.replace(path)
        paths[clip] = path
    return paths


def fit_subjects(paths: dict[str, Path], stages, source_frames: dict[str, set[int]], size: int,
                 cache: Path, reuse: bool = False):
    """The job's fits, as inference fits raw inputs (``expportrait.reenactment.fitted_subject``):
    each video decoded by the job's decode and fitted whole (a driver), and each of its frames in
    ``source_frames`` fitted alone (a source image, as ``reenact`` fits one); all seen in the whole
    frame at ``size`` (``in_full_frame``). ``cache``: a folder keeping each fitted clip (read back
    when ``reuse``). Returns (drivers by clip, sources by (clip, frame), failures: name -> status,
    seconds)."""
    from expportrait.reenactment import Subject, SubjectError, fitted_subject, in_full_frame, read_frames
    drivers, sources, failures = {}, {}, {}
    t0 = time.perf_counter()

    def fitted(frames, name, fps):
        file = cache / f"{Path(name).name.replace('#', '_f')}_{size}.npz"
        if reuse and file.is_file():
            return Subject(read_fitted(file), frames, name, fps=fps)
        subject = in_full_frame(fitted_subject(frames, stages, name, fps), size)
        write_fitted(subject.clip, file)
        return subject

    for clip, path in paths.items():
        full, fps = read_frames(path, None, stages.config)
        try:
            drivers[clip] = fitted(full, str(path), fps)
        except SubjectError as exc:
            failures[clip] = exc.status
        for f in sorted(source_frames.get(clip, ())):
            try:
                sources[(clip, f)] = fitted(full[f:f + 1], f"{path}#{f}", fps)
            except SubjectError as exc:
                failures[f"{clip}#{f}"] = exc.status
    return drivers, sources, failures, time.perf_counter() - t0


def write_fitted(clip, path: Path) -> None:
    """A FittedClip as npz (no pickle): per-frame arrays, β, Δg, Δf, image size, source."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial.npz")
    import numpy as np
    np.savez(tmp, betas=clip.betas, static_offsets=clip.static_offsets, dynamic_offsets=clip.dynamic_offsets,
             image_size=np.int64(clip.image_size), source=np.str_(clip.source),
             **{f"arrays_{k}": v for k, v in clip.arrays.items()})
    tmp.replace(path)


def read_fitted(path: Path):
    """The FittedClip :func:`write_fitted` wrote."""
    import numpy as np

    from preprocessing.fitted_clip import FittedClip
    with np.load(path, allow_pickle=False) as z:
        return FittedClip({k[len("arrays_"):]: z[k] for k in z.files if k.startswith("arrays_")}, z["betas"],
                          z["static_offsets"], int(z["image_size"]), str(z["source"]), z["dynamic_offsets"])


def fitted_window_normals(reenactor, source, driver, frames: list[int]):
    """(driving normals (3, F, S, S) in [-1, 1] of a window whose frame 0 is the source reference,
    its reference normal (3, S, S)) built as ``expportrait reenact`` builds them
    (``Reenactor.driving_normals``: the driver's fitted expression through the frozen transfer
    module, its head motion since ``frames[0]`` retargeted onto the source's fitted pose, rendered
    by the generator's one normal-map render); ``frames``: the driver's frames, the first being the
    reference of its motion (its normal is replaced by the source's)."""
    from dataclasses import replace

    import numpy as np
    import torch

    from models.generator.frames import generator_video
    normals, ref = reenactor.driving_normals(source, replace(driver, clip=driver.clip.select(list(frames))))
    video = generator_video(torch.as_tensor(np.concatenate([ref[None], normals[1:]]))[None], reenactor.settings.size)
    return video[0], video[0, :, 0]


def cross_pairs(corpus: Path, samples: dict, split: str) -> list[tuple[str, str]]:
    """(source clip, driver clip) of held-out identities: for each driver clip of ``split`` in the
    world's ``pairs.parquet``, its first target identity (with a clip 0 in ``samples``) as the source."""
    import pandas as pd
    pairs = pd.read_parquet(corpus / "pairs.parquet")
    out, seen = [], set()
    for r in pairs[pairs.split == split].itertuples():
        source = f"{r.target_identity_id}_clip00"
        if r.driver_clip_id in seen or r.driver_clip_id not in samples or source not in samples:
            continue
        seen.add(r.driver_clip_id)
        out.append((source, r.driver_clip_id))
    return out


def cross_windows(world, corpus: Path, pairs: list[tuple[str, str]], samples: dict, starts: list[int],
                  window: int, stride: int, size: int, samples_3dmm: dict | None = None) -> list[dict]:
    """Windows of the cross pairs: frame 0 the source's frame 0 (its image and true normal map),
    frames 1.. the driver's ``start + k * stride`` performed by the source identity
    (``driven_clip``: the exact cross truth) with the exact normal maps of that head
    (``generator_normal_maps``; ``normals_3dmm``: of the 3DMM head alone, with ``samples_3dmm``'s
    reference normal)."""
    import torch

    from expportrait.evaluation.motion import MotionFit, head_rotation_in_camera
    from models.generator.frames import generator_normal_maps, unit
    from preprocessing.synthetic.world import driven_clip
    out = []
    total = min(s["frames"].shape[0] for s in samples.values())
    for source, driver in pairs:
        for start in starts:
            frames = [start + k * stride for k in range(1, window)]
            if frames[-1] >= total:
                continue
            dc = driven_clip(world, corpus, source, driver, frames=frames, size=size)
            with torch.no_grad():
                normals = generator_normal_maps(world.head, dc.params, dc.static_offsets, dc.dynamic_offsets,
                                                dc.camera, size)
            ref = samples[source]
            p = dc.params
            w = {"source": source, "driver": driver, "start": start, "frames": frames,
                 "exact": MotionFit("ok", p.expression.numpy(), p.jaw_pose.numpy(),
                                    head_rotation_in_camera(dc.camera.R, p.global_orient, p.neck_pose, p.head_pose)),
                 "identity": ref["identity"], "truth_frames": dc.frames,
                 "video": unit(torch.cat([ref["frames"][:1], torch.as_tensor(dc.frames)])[None])[0],
                 "normals": unit(torch.cat([ref["normals"][:1], normals])[None])[0]}
            if samples_3dmm is not None:
                with torch.no_grad():
                    bare = generator_normal_maps(world.head, dc.params, None, None, dc.camera, size)
                w["normals_3dmm"] = unit(torch.cat([samples_3dmm[source]["normals"][:1], bare])[None])[0]
            out.append(w)
    return out


def pair_videos(windows: list[dict], generated) -> dict[tuple[str, str], object]:
    """Each pair's video, uint8 (T, H, W, 3): the source reference (frame 0 of its windows, the
    pose the driver's motion is retargeted onto), then the driven frames (1..) of its windows in
    start order."""
    import numpy as np

    from models.generator.frames import to_uint8
    frames = to_uint8(generated)                                   # (N, F, H, W, 3)
    out: dict = {}
    for w, f in sorted(zip(windows, frames), key=lambda x: x[0]["start"]):
        pair = (w["source"], w["driver"])
        if pair not in out:
            out[pair] = [to_uint8(w["video"][None])[0, :1].numpy()]
        out[pair].append(f[1:].numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def exact_motion_errors(corpus: Path, windows: list[dict], num_expression: int = 50) -> dict[str, dict]:
    """AED / APD / APD motion of the cross ``truth`` and the still ``copy`` against the ``driver``
    from the world's exact parameters (no fitter; the frames of :func:`pair_videos`): what the
    fitted figures would be with a perfect tracker. The exact truth's APD to the driver is the
    offset between the source's and the driver's starting poses, which retargeting keeps."""
    import numpy as np

    from expportrait.evaluation.motion import MotionFit, expression_pose_distance, head_rotation_in_camera
    from preprocessing.synthetic.world import load_clip

    def fit(clip: dict, ids: list[int]) -> MotionFit:
        return MotionFit("ok", np.asarray(clip["expression"])[ids], np.asarray(clip["jaw_pose"])[ids],
                         head_rotation_in_camera(np.asarray(clip["camera_R"])[ids], *(
                             np.asarray(clip[k])[ids] for k in ("global_orient", "neck_pose", "head_pose"))))

    def cat(fits: list[MotionFit]) -> MotionFit:
        return MotionFit("ok", *(np.concatenate([getattr(f, k) for f in fits])
                                 for k in ("expression", "jaw", "head_rotation")))
    acc: dict = {}
    by_pair: dict = {}
    for w in sorted(windows, key=lambda x: x["start"]):
        by_pair.setdefault((w["source"], w["driver"]), []).append(w)
    for (source, driver), ws in by_pair.items():
        frames = [0] + [f for w in ws for f in w["frames"]]
        s0 = fit(load_clip(corpus, source), [0])
        truth = cat([s0, *[w["exact"] for w in ws]])                 # the source's frame 0, then the driven frames
        copy = cat([s0] * len(frames))
        ref = fit(load_clip(corpus, driver), frames)
        for name, f in (("truth", truth), ("copy", copy)):
            d = expression_pose_distance(f, ref, num_expression, first=1)
            acc.setdefault(f"{name}_vs_driver", {})["|".join((source, driver))] = {
                k: d[k] for k in ("aed", "apd_deg", "apd_motion_deg")}
    return acc


def motion_errors(videos: dict[str, dict], head) -> dict[str, dict]:
    """AED and APD (``expportrait.evaluation.motion``, as ``expportrait evaluate`` measures them:
    each video fitted by fit_motion, compared by expression_pose_distance) of each pair's videos
    ``videos[name][pair]`` against the pair's ``driver`` video and its cross ``truth``; the
    ``copy`` video (the still reference) is fitted once per source. Per (name, against): per pair
    ``{"aed", "apd_deg"}`` (NaN where no face was fitted in a video)."""
    import torch

    from expportrait.evaluation.motion import expression_pose_distance, fit_motion

    def fit(video):
        torch.manual_seed(0)                  # as expportrait.evaluation.motion.aed_apd fits
        return fit_motion(video, head)

    acc: dict = {}
    copies: dict = {}
    for pair in videos["truth"]:
        refs = {"driver": fit(videos["driver"][pair]), "truth": fit(videos["truth"][pair])}
        for name, by_pair in videos.items():
            if name == "driver" or pair not in by_pair:
                continue
            if name == "copy":
                if pair[0] not in copies:
                    copies[pair[0]] = fit(by_pair[pair])
                f = copies[pair[0]]
            else:
                f = refs["truth"] if name == "truth" else fit(by_pair[pair])
            for against, ref in refs.items():
                if name == against:
                    continue
                d = expression_pose_distance(f, ref, first=1)           # frame 0: the source reference
                acc.setdefault(f"{name}_vs_{against}", {})["|".join(pair)] = {
                    k: d[k] for k in ("aed", "apd_deg", "apd_motion_deg")}
    return acc


def motion_summary(motion: dict) -> dict:
    """Means over the pairs whose videos were fitted, and how many were, per (name, against)."""
    def avg(values: list[float]) -> float | None:
        m = mean(values)
        return round(m, 4) if m == m else None
    return {key: {**{k: avg([v.get(k, float("nan")) for v in by_pair.values()])
                     for k in ("aed", "apd_deg", "apd_motion_deg")},
                  "pairs_fitted": sum(v["apd_deg"] == v["apd_deg"] for v in by_pair.values())}
            for key, by_pair in motion.items()}


def motion_ratio(motion: dict, name: str, base: str, against: str, key: str) -> float | None:
    """mean ``name`` / mean ``base`` of ``key`` against ``against``, over the pairs where both were
    fitted (None: no such pair)."""
    a, b = motion.get(f"{name}_vs_{against}", {}), motion.get(f"{base}_vs_{against}", {})
    both = [p for p in a if p in b and a[p][key] == a[p][key] and b[p][key] == b[p][key]]
    den = mean([b[p][key] for p in both])
    return round(mean([a[p][key] for p in both]) / den, 4) if both and den else None


def from_recipe(args) -> None:
    """Fill what the command line left out from the recipe (``args.given_*``: what it set)."""
    from expportrait.recipes import load_recipe
    recipe = args.recipe_obj = load_recipe(args.recipe)
    g = recipe.generator_init()
    recipe_values = {"window": g["frames"], "stride": g["frame_stride"], "flavor": g["flavor"],
                     "size": recipe.training_size(), "codec_kind": recipe.codec.kind}
    for name, value in recipe_values.items():
        setattr(args, f"given_{name}", getattr(args, name) is not None)
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.codec_kind is None and not args.codec_dir:
        raise SystemExit(f"recipe {recipe.name} names no codec kind to train: give --codec-kind or --codec-dir")
    log(f"recipe {recipe.name}: flavor {args.flavor}, codec {args.codec_kind}, window {args.window} every "
        f"{args.stride}, {args.size}²")


def main(argv: list[str] | None = None) -> int:
    from expportrait.commands.demo import DemoScale
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="outputs/bench/generator")
    p.add_argument("--identities", type=int, default=48,
                   help="identities of the corpus (48: the README's headline; 75/12.5/12.5 %% train/val/test)")
    p.add_argument("--clips", type=int, default=2)
    p.add_argument("--recipe", default="tiny_cpu", help="configs/recipes/NAME.yaml (its generator, codec, window)")
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--size", type=int, default=None, help="corpus frame size (default: the recipe's training size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", type=int, default=None, help="frames per window (4k+1; default: the recipe's)")
    p.add_argument("--stride", type=int, default=None, help="every stride-th frame (default: the recipe's)")
    p.add_argument("--flavor", default=None,
                   help="generator flavor (default: the recipe's; tiny_z16: on the tiny Wan VAE)")
    p.add_argument("--codec-kind", default=None, choices=["space_to_depth", "wan_vae"],
                   help="space_to_depth: the lossless fixed codec (z 48, /2); wan_vae: a tiny trained Wan VAE "
                        "(default: the recipe's)")
    p.add_argument("--codec-steps", type=int, default=2000)
    p.add_argument("--codec-dim", type=int, default=8)
    p.add_argument("--codec-lr", type=float, default=2e-3)
    p.add_argument("--codec-dir", default=None, help="use this trained codec folder (train_codec output)")
    p.add_argument("--train-steps", type=int, default=5800)
    p.add_argument("--train-minutes", type=float, default=19.0,
                   help="wall-clock cap of the generator's training (process start and export come on top)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="train with torch.compile (GeneratorTask.compile, run 22; --no-compile: eager, as runs "
                        "1-21 and 23). Its gain is within this host's noise: 4490-4660 steps in the cap compiled, "
                        "3720-4380 eager; 400-step pairs back to back: equal. Compiling takes 10 s to ~1 min")
    p.add_argument("--train-arg", action="append", default=[], help="extra training CLI argument (repeatable)")
    p.add_argument("--sample-steps", type=int, default=None, help="sampler steps (default: the trained task's)")
    p.add_argument("--sample-shift", type=float, default=None,
                   help="sampler sigma shift (default: the trained task's `shift`, as reenactment uses it)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance over the normals (1: off)")
    p.add_argument("--eval-split", default="test", choices=["test", "val"],
                   help="held-out identities to evaluate on: choose sampler settings on val, report on test")
    p.add_argument("--starts", default="0,7,14", help="window start frames within each test clip")
    p.add_argument("--cross-starts", default="0,16",
                   help="window start frames of the cross pairs (chained: frames 4..32 every 4th by default)")
    p.add_argument("--train-threads", type=int, default=os.cpu_count(),
                   help="torch threads of the codec, generator and transfer training processes (default: every "
                        "core; runs 1-14 in the README trained on 1 thread); evaluation and fits run on 1")
    p.add_argument("--transfer-epochs", type=int, default=DemoScale.transfer_epochs,
                   help="epochs of the transfer module (default: the demo's)")
    p.add_argument("--transfer-dir", default=None, help="use this exported transfer module instead of training one")
    p.add_argument("--fit-size", type=int, default=None,
                   help="side of the renders the fitter sees (default: the recipe's crop size)")
    p.add_argument("--train-normals", default="exact", choices=["exact", "fitted"],
                   help="the training shards' normal maps: the true head's, or the fitter's head on the job's path "
                        "(train/val clips fitted as the fitted path fits its drivers; shards_fitted)")
    p.add_argument("--no-fitted", action="store_true", help="skip the fitted-normal path (no transfer module, no fits)")
    p.add_argument("--no-motion", action="store_true", help="skip AED/APD (fits every cross video)")
    p.add_argument("--ablation", action="store_true",
                   help="also train and evaluate the recipe on 3DMM-only normals (Δg = Δf = 0): personalized_* keys")
    p.add_argument("--reuse", action="store_true",
                   help="reuse a trained codec / generator / transfer module and the fits in --work")
    p.add_argument("--ship", default=None, metavar="DIR",
                   help="also write the trained generator (fp16) + its codec + provenance.json to DIR, a "
                        "starting point to fine-tune from (training/pretrained/tiny_cpu is made with --seed 1: "
                        "identities apart from the demo's seed-0 world); results go to generator_ship.json")
    args = p.parse_args(argv)
    if args.ship:                                  # before the work: --ship replaces its folder
        from training.export import check_init_target
        try:
            check_init_target(args.ship)
        except ValueError as exc:
            print(json.dumps({"error": "UserError", "message": str(exc), "ship": args.ship}))
            return 2
    from_recipe(args)

    import torch
    torch.set_num_threads(1)          # evaluation (sampling speed is per frame on one thread)
    work = (REPO / args.work).resolve() if not Path(args.work).is_absolute() else Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    load_start, t_start = load(), time.perf_counter()
    corpus = make_corpus(work, args)
    shards = make_shards(work, corpus, args.frames)
    codec, codec_minutes = train_codec(work, shards, args)
    load_mid = load()
    from preprocessing.synthetic.world import SyntheticWorld
    world_meta = json.loads((corpus / "world.json").read_text())
    world = SyntheticWorld(world_meta["model_file"], world_meta["config"]["subdivision"])
    stages = job_stages(args, corpus)
    if args.train_normals == "fitted":
        train_shards = make_fitted_shards(work, corpus, world, stages, args)
    else:
        train_shards = shards
    export, train_minutes, samples_trained = train_generator(work, train_shards, codec, args)
    load_train = load()
    transfer_dir = transfer_minutes = transfer_what = None
    if not args.no_fitted:
        transfer_dir, transfer_minutes, transfer_what = train_transfer(work, shards, args)
    if args.ablation:
        shards_3dmm = make_shards(work, corpus, args.frames, personalized=False)
        export_3dmm, train_minutes_3dmm, samples_3dmm_trained = train_generator(work, shards_3dmm, codec, args,
                                                                                 "train_3dmm")
    load_trained = load()
    samples = test_samples(shards, args.eval_split)
    windows = test_windows(shards, args.window, args.stride, [int(s) for s in args.starts.split(",")],
                           args.eval_split, samples)
    log(f"evaluating {len(windows)} {args.eval_split} windows")
    # the sampler as the trained task samples (and as `register` packs it), unless given
    from training.tasks.generator import sampler_settings
    from training.export import load_checkpoint_state
    hp = load_checkpoint_state(work / "train" / "checkpoints" / "last.ckpt")["hyper_parameters"]
    trained = sampler_settings(hp)
    shift = args.sample_shift if args.sample_shift is not None else float(trained["shift"])
    steps = args.sample_steps or int(trained["steps"] or 10)
    settings = {"steps": steps, "shift": shift, "guidance": args.guidance, "seed": args.seed}
    sampler = Sampler.load(export, codec, **settings)
    ev = evaluate(sampler, windows)
    ps, ss = ev["psnr_db"], ev["ssim"]
    print(f"\n{'':<10}{'PSNR dB':>9}{'SSIM':>8}   held-out identities {ev['identities']}, {ev['windows']} windows "
          f"of {args.window} frames every {args.stride}")
    for k in ("model", "copy", "shuffled", "codec"):
        print(f"{k:<10}{ps[k]:>9.2f}{ss[k]:>8.3f}")

    # -- cross pairs (exact normals) ------------------------------------------------------------
    samples_3dmm = test_samples(shards_3dmm, args.eval_split) if args.ablation else None
    pairs = cross_pairs(corpus, samples, args.eval_split)
    cross = cross_windows(world, corpus, pairs, samples, [int(s) for s in args.cross_starts.split(",")],
                          args.window, args.stride, args.size, samples_3dmm)
    log(f"cross: {len(pairs)} pairs, {len(cross)} windows")
    cvideo = torch.stack([w["video"] for w in cross])
    cref = cvideo[:, :, 0]
    cgen = sampler(cref, torch.stack([w["normals"] for w in cross]))
    cross_scores = {"model": window_scores(cgen, cvideo),
                    "copy": window_scores(cref[:, :, None].expand_as(cvideo), cvideo)}
    motion_videos = {"model": pair_videos(cross, cgen), "truth": pair_videos(cross, cvideo),
                     "copy": pair_videos(cross, cref[:, :, None].expand_as(cvideo).contiguous())}
    drv_frames = {}
    for w in cross:
        drv_frames.setdefault((w["source"], w["driver"]), []).append(
            (w["start"], samples[w["driver"]]["frames"][w["frames"]]))
    motion_videos["driver"] = {   # its frame 0 first: where its motion starts
        k: torch.cat([samples[k[1]]["frames"][:1], *[f for _, f in sorted(v, key=lambda x: x[0])]]).numpy()
        for k, v in drv_frames.items()}
    motion_exact = exact_motion_errors(corpus, cross)

    # -- the fitted path ------------------------------------------------------------------------
    fitted = {}
    if not args.no_fitted:
        from dataclasses import replace as dc_replace

        from expportrait.reenactment import Reenactor
        from models.transfer import ExpressionTransfer
        stage_config = stages.config
        fit_size = args.fit_size or stage_config.crop_size
        settings_inf = dc_replace(args.recipe_obj.inference_settings(), size=args.size, window=args.window,
                                  frame_stride=args.stride, steps=steps, shift=shift, guidance=args.guidance)
        reenactor = Reenactor(sampler.model, sampler.codec, stages,
                              ExpressionTransfer.from_pretrained(transfer_dir).eval(), settings_inf, "cpu")
        need = sorted({w["clip"] for w in windows} | {d for _, d in pairs})
        source_frames: dict[str, set[int]] = {}
        for w in windows:
            source_frames.setdefault(w["clip"], set()).add(w["start"])
        for src, _ in pairs:
            source_frames.setdefault(src, set()).add(0)
        videos = fit_videos(work, corpus, world, need, fit_size)
        log(f"fitting {len(videos)} clips at {fit_size}² whole and {sum(map(len, source_frames.values()))} source "
            f"frames alone on the job's path ({stage_config.model_dump(include={'crop_size', 'fov_deg', 'fit'})})")
        drivers, sources, failures, fit_seconds = fit_subjects(videos, stages, source_frames, args.size,
                                                               work / "fit_cache", args.reuse)
        log(f"fits in {fit_seconds / 60:.1f} min; failures: {failures or 'none'}")
        span = [k * args.stride for k in range(args.window)]
        fw = [(w, sources[(w["clip"], w["start"])], drivers[w["clip"]]) for w in windows
              if (w["clip"], w["start"]) in sources and w["clip"] in drivers]
        built = [fitted_window_normals(reenactor, src, drv, [w["start"] + d for d in span]) for w, src, drv in fw]
        fvideo = torch.stack([w["video"] for w, _, _ in fw])
        fgen = sampler(fvideo[:, :, 0], torch.stack([b[0] for b in built]), torch.stack([b[1] for b in built]))
        fitted["self"] = {"model": window_scores(fgen, fvideo),
                          "copy": window_scores(fvideo[:, :, 0, None].expand_as(fvideo), fvideo),
                          "windows": len(fw)}
        cw = [w for w in cross if (w["source"], 0) in sources and w["driver"] in drivers]
        built = [fitted_window_normals(reenactor, sources[(w["source"], 0)], drivers[w["driver"]], [0, *w["frames"]])
                 for w in cw]
        cfv = torch.stack([w["video"] for w in cw])
        cfgen = sampler(cfv[:, :, 0], torch.stack([b[0] for b in built]), torch.stack([b[1] for b in built]))
        fitted["cross"] = {"model": window_scores(cfgen, cfv),
                           "copy": window_scores(cfv[:, :, 0, None].expand_as(cfv), cfv), "windows": len(cw)}
        motion_videos["model_fitted"] = pair_videos(cw, cfgen)
        fitted.update(failures=failures, fit_minutes=round(fit_seconds / 60, 2), fit_size=fit_size)

    # -- the ablation: 3DMM-only normals ----------------------------------------------------------
    ablation = {}
    if args.ablation:
        sampler3 = Sampler.load(export_3dmm, codec, **settings)
        w3 = test_windows(shards_3dmm, args.window, args.stride, [int(s) for s in args.starts.split(",")],
                          args.eval_split, samples_3dmm)
        v3 = torch.stack([w["video"] for w in w3])
        ablation["self"] = window_scores(sampler3(v3[:, :, 0], torch.stack([w["normals"] for w in w3])), v3)
        gen3 = sampler3(cref, torch.stack([w["normals_3dmm"] for w in cross]))
        ablation["cross"] = window_scores(gen3, cvideo)
        motion_videos["model_3dmm"] = pair_videos(cross, gen3)

    motion = {}
    if not args.no_motion:
        t0 = time.perf_counter()
        motion = motion_errors(motion_videos, stages.head)
        log(f"AED/APD of {len(pairs)} cross pairs in {(time.perf_counter() - t0) / 60:.1f} min: "
            f"{json.dumps(motion_summary(motion))}")

    cps = {k: mean(v["psnr"]) for k, v in cross_scores.items()}
    print(f"cross     model {cps['model']:.2f} dB, copy {cps['copy']:.2f} dB against the exact cross truth "
          f"({len(cross)} windows)")
    mot = lambda name, base, against, k: motion_ratio(motion, name, base, against, k)   # noqa: E731
    result = {
        "psnr_gain_db": round(ps["model"] - ps["copy"], 3),
        "shuffled_drop_db": round(ps["model"] - ps["shuffled"], 3),
        "psnr_gain_db_fitted": None, "cross_psnr_gain_db": round(cps["model"] - cps["copy"], 3),
        "cross_psnr_gain_db_fitted": None,
        "cross_apd_ratio": mot("model", "copy", "driver", "apd_deg"),
        "cross_aed_ratio": mot("model", "copy", "driver", "aed"),
        "cross_apd_ratio_fitted": mot("model_fitted", "copy", "driver", "apd_deg"),
        "cross_aed_ratio_fitted": mot("model_fitted", "copy", "driver", "aed"),
        "cross_apd_ratio_gt": mot("model", "copy", "truth", "apd_deg"),
        "cross_aed_ratio_gt": mot("model", "copy", "truth", "aed"),
        "cross_apd_ratio_fitted_gt": mot("model_fitted", "copy", "truth", "apd_deg"),
        "cross_aed_ratio_fitted_gt": mot("model_fitted", "copy", "truth", "aed"),
        "cross_apd_ratio_truth": mot("truth", "copy", "driver", "apd_deg"),
        "cross_aed_ratio_truth": mot("truth", "copy", "driver", "aed"),
        # the head's motion since frame 0 (what retargeting transfers; see exact_motion_errors)
        "cross_apd_motion_ratio": mot("model", "copy", "driver", "apd_motion_deg"),
        "cross_apd_motion_ratio_fitted": mot("model_fitted", "copy", "driver", "apd_motion_deg"),
        "cross_apd_motion_ratio_truth": mot("truth", "copy", "driver", "apd_motion_deg"),
        # the same ratios from the world's exact parameters (a perfect tracker): the ceilings
        "cross_apd_ratio_exact_truth": motion_ratio(motion_exact, "truth", "copy", "driver", "apd_deg"),
        "cross_apd_motion_ratio_exact_truth": motion_ratio(motion_exact, "truth", "copy", "driver", "apd_motion_deg"),
        "cross_motion_exact": motion_summary(motion_exact),
        "psnr_model_db": round(ps["model"], 3), "psnr_copy_db": round(ps["copy"], 3),
        "psnr_shuffled_db": round(ps["shuffled"], 3), "psnr_codec_db": round(ps["codec"], 3),
        "ssim_model": round(ss["model"], 4), "ssim_copy": round(ss["copy"], 4),
        "ssim_shuffled": round(ss["shuffled"], 4), "ssim_codec": round(ss["codec"], 4),
        "cross_psnr_model_db": round(cps["model"], 3), "cross_psnr_copy_db": round(cps["copy"], 3),
        "cross_motion": motion_summary(motion),
        "train_minutes": round(train_minutes, 2) if train_minutes is not None else None,
        "train_samples": samples_trained,
        "train_samples_per_s": round(samples_trained / (train_minutes * 60), 3) if train_minutes else None,
        "codec_minutes": round(codec_minutes, 2) if codec_minutes is not None else None,
        "sample_seconds_per_frame": round(sampler.seconds / max(sampler.frames, 1), 4),
        "recipe": args.recipe, "window": args.window, "stride": args.stride, "flavor": args.flavor,
        "sample_steps": steps, "sample_shift": shift, "guidance": args.guidance,
        "identities": args.identities, "test_windows": ev["windows"], "eval_split": args.eval_split,
        "reused": args.reuse, "train_normals": args.train_normals,
        "compile": bool(hp.get("compile", False)),           # of the training evaluated (--reuse: the reused one)
        "cross_pairs": len(pairs), "cross_windows": len(cross),
        "driving_normals": "psnr_gain_db, shuffled_drop_db, cross_*: exact (rendered from the true head); "
                           "*_fitted: fitted on the job's path through the transfer module, as `reenact` builds them",
    }
    if fitted:
        fs, fc = fitted["self"], fitted["cross"]
        result.update({
            "psnr_gain_db_fitted": round(mean(fs["model"]["psnr"]) - mean(fs["copy"]["psnr"]), 3),
            "cross_psnr_gain_db_fitted": round(mean(fc["model"]["psnr"]) - mean(fc["copy"]["psnr"]), 3),
            "psnr_model_db_fitted": round(mean(fs["model"]["psnr"]), 3), "fitted_windows": fs["windows"],
            "cross_fitted_windows": fc["windows"], "fit_failures": fitted["failures"],
            "fit_minutes": fitted["fit_minutes"], "fit_size": fitted["fit_size"],
            "transfer_module": transfer_what,
            "transfer_minutes": round(transfer_minutes, 2) if transfer_minutes else None})
        print(f"fitted    model {mean(fs['model']['psnr']):.2f} dB vs copy {mean(fs['copy']['psnr']):.2f} dB (self, "
              f"{fs['windows']} windows); cross model {mean(fc['model']['psnr']):.2f} dB")
    if ablation:
        p3, c3 = mean(ablation["self"]["psnr"]), mean(ablation["cross"]["psnr"])
        result.update({
            "personalized_gain_db": round(ps["model"] - p3, 3),
            "personalized_gain_db_cross": round(cps["model"] - c3, 3),
            "personalized_aed_ratio": mot("model", "model_3dmm", "driver", "aed"),
            "personalized_aed_ratio_gt": mot("model", "model_3dmm", "truth", "aed"),
            "personalized_apd_ratio": mot("model", "model_3dmm", "driver", "apd_deg"),
            "personalized_apd_motion_ratio": mot("model", "model_3dmm", "driver", "apd_motion_deg"),
            "psnr_model_db_3dmm": round(p3, 3), "cross_psnr_model_db_3dmm": round(c3, 3),
            "train_minutes_3dmm": round(train_minutes_3dmm, 2) if train_minutes_3dmm is not None else None,
            "train_samples_3dmm": samples_3dmm_trained})
        print(f"ablation  3DMM-only normals: self {p3:.2f} dB (personalized {ps['model']:.2f}), cross {c3:.2f} dB")
    result.update({
        "load_avg_1min": {"start": round(load_start, 2), "after_codec": round(load_mid, 2),
                          "after_train": round(load_train, 2), "after_all_training": round(load_trained, 2),
                          "end": round(load(), 2)},
        "cpu_cores": os.cpu_count(), "train_threads": args.train_threads,
        "total_minutes": round((time.perf_counter() - t_start) / 60, 2),
        "targets": {"psnr_gain_db": ">= 3", "shuffled_drop_db": ">= 2", "train_minutes": "<= 20",
                    "psnr_gain_db_fitted": ">= 2", "cross_psnr_gain_db": ">= 2", "cross_apd_ratio": "<= 0.6",
                    "cross_apd_motion_ratio": "<= 0.6 (cross_apd_ratio's target read on the head's motion: the exact "
                                              "truth's own cross_apd_ratio is cross_apd_ratio_exact_truth)"}})
    print(json.dumps(result))
    from _report import write_result           # benchmarks/results/generator.json
    write_result(result, name="generator_ship" if args.ship else
                 "generator_fitted" if args.train_normals == "fitted" else None)
    if args.ship:
        shipped = ship(export, codec, corpus, args, result)
        log(f"shipped the generator and its codec -> {shipped.root}")
    return 0


def ship(export: Path, codec: Path, corpus: Path, args, result: dict):
    """``--ship``: the EMA export and its codec as a starting point (``training.export.write_init_folder``),
    with how it was made and its own held-out figures from ``result``."""
    import shlex

    import pandas as pd

    from _report import git_commit
    from training.export import write_init_folder
    manifest = pd.read_parquet(corpus / "manifest.parquet")
    world = json.loads((corpus / "world.json").read_text())
    return write_init_folder(export, codec, args.ship, {
        "what": f"the {args.recipe} recipe's generator trained by benchmarks/generator.py on a synthetic corpus "
                f"(world seed {args.seed}); a starting point to fine-tune from, not a model of real faces",
        "command": shlex.join(["python", *sys.argv]), "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"), "recipe": args.recipe, "flavor": args.flavor,
        "window": args.window, "stride": args.stride, "size": args.size,
        "world": {k: world["config"][k] for k in ("identities", "clips_per_identity", "frames", "size", "seed")},
        "train_identities": sorted(manifest.loc[manifest["split"] == "train", "identity_id"].unique().tolist()),
        "train_samples": result["train_samples"], "train_minutes": result["train_minutes"],
        "weights_dtype": "float16 (loaders cast back to their dtype)",
        "held_out": {k: result[k] for k in ("psnr_gain_db", "psnr_model_db", "psnr_copy_db", "shuffled_drop_db",
                                            "cross_psnr_gain_db", "cross_apd_ratio", "cross_aed_ratio",
                                            "test_windows", "cross_pairs")}})


if __name__ == "__main__":
    raise SystemExit(main())
