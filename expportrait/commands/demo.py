"""`expportrait demo`: the main loop end to end on embedded defaults (grows with the project).

Now: write the synthetic SMPL-X-format model; generate a small synthetic talking-head corpus
with exact ground truth; render the head-representation sweep (mp4 + normal / depth / mask
maps + the personalized mesh); fit one corpus clip through the real-video path (detection,
MediaPipe landmarks, crop, fit) and write its overlay video; run the preprocessing job
(embedded Ray, ``configs/preprocess/local.yaml``) on the corpus into WebDataset shards and
read a batch back with the training reader.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo on embedded defaults")
    p.add_argument("--out", type=Path, default=Path("outputs/demo"))
    p.add_argument("--size", type=int, default=256)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict:
    from expportrait.assets import synthetic_model_file
    from . import head

    print(f"[demo] synthetic SMPL-X-format model -> {args.out / 'models'}", flush=True)
    model = synthetic_model_file(seed=0, directory=args.out / "models")
    from preprocessing.synthetic.world import WorldConfig, generate_corpus
    print(f"[demo] synthetic talking-head corpus -> {args.out / 'corpus'}", flush=True)
    corpus = generate_corpus(args.out / "corpus", WorldConfig(identities=4, clips_per_identity=2,
                                                              frames=48, size=128, seed=0), model)
    print(f"[demo] corpus: {corpus.clips} clips, {corpus.frames} frames in {corpus.seconds:.1f} s; "
          f"manifest {corpus.out / 'manifest.parquet'}")
    print(f"[demo] rendering the head sweep -> {args.out / 'head'}", flush=True)
    render_args = argparse.Namespace(model=model, out=args.out / "head", size=args.size,
                                     frames_per_segment=16, fps=24.0, subdivision=1,
                                     backend="auto", seed=0)
    rendered = head.render(render_args)
    print(f"[demo] sweep video: {rendered['video']}")
    print(f"[demo] maps: {args.out / 'head'}/<segment>_{{normal,depth_mm,mask}}.png")
    print(f"[demo] personalized mesh: {rendered['mesh']}")
    from . import fit
    clip_video = corpus.out / "clips" / "id000_clip00.mp4"
    print(f"[demo] fitting {clip_video} -> {args.out / 'fit'}", flush=True)
    fitted = fit.run(argparse.Namespace(
        video=clip_video, image=None, out=args.out / "fit", identity="id000", identity_from=None,
        model=model, fps=None, max_frames=None, crop_size=256, fov=22.0, estimator=None,
        estimator_weights=None, no_overlay=False, seed=0))
    print(f"[demo] fit: {fitted.get('frames')} frames, status {fitted['status']}, median landmark "
          f"error {fitted.get('median_landmark_error_pct', float('nan')):.2f} % of face size; "
          f"overlay {fitted.get('overlay')}")
    from pipelines.preprocess import load_config
    from pipelines.preprocess import run as run_job
    config = Path("configs/preprocess/local.yaml")
    cfg = load_config(config if config.is_file() else None,
                      {"input": str(corpus.out / "manifest.parquet"), "output": str(args.out / "preprocess"),
                       "head_model": str(model)})
    print(f"[demo] preprocessing job (embedded Ray) -> {cfg.output}", flush=True)
    job = run_job(cfg)
    if job.get("fault"):                      # e.g. a full disk: say so rather than read a partial output
        raise RuntimeError(f"preprocessing job stopped: {job['fault']['error']}: {job['fault']['message']}")
    print(f"[demo] job: {job['ok']}/{job['inputs']} clips ok, {job['samples']} samples in "
          f"{len([s for s in job['shards'] if s['tar']])} shard(s); manifest {cfg.output}/manifest.parquet")
    from training.data.shards import make_loader
    batch = next(iter(make_loader(cfg.output, samples_per_rank=2, batch_size=2, num_workers=0, split="train")))
    print(f"[demo] reader: batch of {len(batch['key'])}: frames {tuple(batch['frames'].shape)}, normals "
          f"{tuple(batch['normals'].shape)}, expression {tuple(batch['smplx']['expression'].shape)}")
    return {"model": str(model), "corpus": {"path": str(corpus.out), "clips": corpus.clips,
                                            "frames": corpus.frames}, "head": rendered, "fit": fitted,
            "preprocess": {k: job[k] for k in ("inputs", "ok", "failed", "samples", "output")}}
