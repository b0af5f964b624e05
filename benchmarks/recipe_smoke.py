"""Every recipe end to end at its real shape, with a tiny model width, on this CPU host.

    python benchmarks/recipe_smoke.py [--recipes tiny_cpu,wan1.3b,wan14b_lora] [--work outputs/bench/recipe_smoke]
        [--identities 3] [--steps 2] [--resume-steps 1] [--corpus-size 256] [--reuse]

For each recipe (``configs/recipes/<name>.yaml``, loaded by ``expportrait.recipes``):

1. a synthetic corpus (``--identities`` identities, one clip each, split by identity into
   train / val / test) with clips of the recipe's segment length (24, 49, 81 frames);
2. the recipe's preprocessing (its ``configs/preprocess/*.yaml`` and stage overrides: crop size,
   segment and minimum frames, frame codec) through the Ray job (``expportrait preprocess --recipe``,
   embedded Ray); only input, output and head model are this run's;
3. the recipe's transfer module, trained for ``--steps`` steps (its config; the frozen module the
   driving normals are rendered through) and exported;
4. the codec: the recipe's (``codec.kind``) or the generator config's VAE folder when it is here,
   else the tiny Wan VAE the tests use (``LatentCodec.tiny``, random, seed 0: same class, z 16,
   4x time, 8x space; the result says which);
5. the precompute jobs the recipe's generator config reads from (``data.init_args.latents`` /
   ``normals``): ``python -m pipelines.encode_latents`` and ``python -m pipelines.render_normals``
   (embedded Ray), their ``--output`` given to training as the config gives the RayJobs' output;
6. ``expportrait preflight --recipe NAME`` on the shards (and sidecars): must pass;
7. the generator's training (``python -m training.train fit``) with the recipe's generator config
   for ``--steps`` steps on 2 CPU processes: its window, stride, crop size, fields, sidecars,
   strategy (the GPU recipes' DeepSpeed ZeRO-2, its init args kept, on CPU through
   ``training.strategies.CPUDeepSpeedStrategy``; the tiny recipe's documented 2-process
   ZeRO-2, ``configs/train/strategy/deepspeed_cpu.yaml``), precision, LoRA, callbacks; changed:
   the model's width (the transformer fields of flavor ``tiny_z16``; LoRA rank 8), no pretrained
   weights (none are here), local folders, batch 1, 1 loader worker, checkpoints every step,
   one validation at the last step, 2 sampler steps for the sample videos;
8. a resume from the last checkpoint (``--ckpt_path last``) for ``--resume-steps`` more steps.

Everything the run changes from the recipe is listed in its result (``changed``). Last stdout line:
one JSON object, per recipe ``ok``, ``window``, ``size``, ``steps``, ``resumed`` and the minutes
of each phase; also ``benchmarks/results/recipe_smoke.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RECIPES = ("tiny_cpu", "wan1.3b", "wan14b_lora")
#: the transformer width of the tiny flavor put on the recipes' flavors (LoRA, latent layout kept)
WIDTH_FIELDS = ("num_heads", "head_dim", "ffn_dim", "num_layers", "text_dim", "freq_dim", "context_tokens",
                "normal_width")
TINY_WIDTH_FLAVOR = "tiny_z16"
TINY_LORA_RANK = 8
CPU_STRATEGY = "training.strategies.CPUDeepSpeedStrategy"
SAMPLE_STEPS = 2            # the sample videos' sampler steps (the recipe's 30 at 33x512²: minutes a video here)
#: per recipe in the last JSON line (the rest: ``details.json`` in ``--work``)
HEADLINE = ("ok", "window", "frame_stride", "size", "crop_size", "steps", "resumed", "resumed_steps", "strategy",
            "codec", "step_reads", "minutes", "error")


def log(msg: str) -> None:
    print(f"[recipe-smoke {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class StepFailed(RuntimeError):
    """A command of the smoke run failed; the message holds its log's tail."""


def run(cmd: list[str], what: str, log_file: Path, timeout: float, threads: int = 1) -> dict:
    """Run ``python CMD`` from the repository root in its own process group (an embedded Ray or
    DeepSpeed's workers stop with it), output to ``log_file``; its last JSON line, with the
    minutes it took. ``StepFailed`` with the log's tail when it exits non-zero or runs out of time."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads), "RAY_USAGE_STATS_ENABLED": "0",
           "TOKENIZERS_PARALLELISM": "false"}
    log_file.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_file, "w") as fh:
        proc = subprocess.Popen([sys.executable, *map(str, cmd)], cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    minutes = (time.perf_counter() - t0) / 60
    text = log_file.read_text(errors="replace")
    if code != 0:
        tail = "\n".join(text.splitlines()[-40:])
        why = f"ran out of its {timeout / 60:.0f} min" if code is None else f"exit {code}"
        raise StepFailed(f"{what} failed ({why}); log {log_file}:\n{tail}")
    result = {}
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                result = json.loads(line)
                break
            except json.JSONDecodeError:
                continue
    return {**result, "minutes": round(minutes, 2)}


# -- the recipe's parts -----------------------------------------------------------------------
def tiny_flavor_overrides(flavor: str) -> dict:
    """``flavor_overrides`` that give the recipe's flavor the tiny width (its LoRA kept, rank
    ``TINY_LORA_RANK``); {} for a tiny flavor (``tiny_*``: the tiny recipe's own)."""
    from models.generator.flavors import FLAVORS
    if flavor.startswith("tiny_"):
        return {}
    base, tiny = FLAVORS[flavor], FLAVORS[TINY_WIDTH_FLAVOR]
    out = {k: getattr(tiny, k) for k in WIDTH_FIELDS}
    if base.lora_rank:
        out.update(lora_rank=TINY_LORA_RANK, lora_alpha=TINY_LORA_RANK)
    return out


def preprocess(recipe, work: Path, corpus: Path, head_model: Path, timeout: float) -> tuple[Path, dict]:
    """The recipe's preprocessing (``expportrait preprocess --recipe``: its config and stage
    overrides) with this run's input, output and head model; (output folder, its result line)."""
    out = work / "preprocess"
    result = run(["-m", "expportrait.cli", "preprocess", "--recipe", recipe.name, "--input",
                  corpus / "manifest.parquet", "--output", out, "--head-model", head_model, "--no-progress"],
                 "preprocessing", work / "logs" / "preprocess.log", timeout, threads=1)
    return out, result


def train_transfer(recipe, work: Path, shards: Path, head_model: Path, steps: int, timeout: float) -> tuple[Path, dict]:
    out = work / "transfer"
    result = run(["-m", "training.train", "fit", *recipe.train_args("transfer"), "--out", out,
                  "--data.init_args.root", shards, "--model.init_args.head_model", head_model,
                  "--trainer.max_steps", steps, "--trainer.enable_progress_bar", "false"],
                 "transfer training", work / "logs" / "transfer.log", timeout, threads=2)
    export = out / "export" / "ema"
    if not (export / "config.json").is_file():
        raise StepFailed(f"transfer training wrote no export at {export}")
    return export, result


def codec_folder(recipe, work: Path, shards: Path, timeout: float) -> tuple[Path, str | None, str]:
    """(codec folder, its subfolder, what it is)."""
    g = recipe.generator_init()
    if g.get("codec") and Path(g["codec"]).is_dir():
        return Path(g["codec"]), g.get("codec_subfolder"), f"the recipe's VAE {g['codec']}"
    out = work / "codec"
    if recipe.codec.kind:                            # the recipe's own codec, made as the recipe makes it
        if not (out / "config.json").is_file():
            run(["-m", "training.tasks.generator", "codec", "--kind", recipe.codec.kind, "--shards", shards,
                 "--out", out, "--frames", g["frames"], "--frame-stride", g["frame_stride"],
                 "--size", recipe.training_size()], "codec", work / "logs" / "codec.log", timeout, threads=2)
        return out, None, f"the recipe's codec ({recipe.codec.kind})"
    if not (out / "config.json").is_file():
        from models.generator import LatentCodec
        LatentCodec.tiny(seed=0).save_pretrained(out)
    return out, None, (f"the tiny Wan VAE of the tests (random weights, seed 0; same class and latent layout): "
                       f"the recipe's {g.get('codec')} is not here")


def precompute(recipe, work: Path, shards: Path, codec: Path, codec_sub: str | None, transfer: Path,
               head_model: Path, timeout: float) -> tuple[dict, dict]:
    """The precompute jobs whose sidecars the recipe's generator config reads: (kind -> the job's
    --output folder, kind -> its result line)."""
    g = recipe.generator_init()
    folders, results = {}, {}
    wanted = recipe.sidecar_folders()
    common = ["--input", shards, "--workers", "1", "--num-cpus", "2", "--no-progress"]
    if wanted["latents"]:
        folders["latents"] = work / "latents"
        results["latents"] = run(["-m", "pipelines.encode_latents", *common, "--output", folders["latents"],
                                  "--codec", codec, *(["--codec-subfolder", codec_sub] if codec_sub else []),
                                  "--batch", "1"],
                                 "encode_latents", work / "logs" / "encode_latents.log", timeout, threads=2)
    if wanted["normals"]:
        folders["normals"] = work / "normals"
        results["normals"] = run(["-m", "pipelines.render_normals", *common, "--output", folders["normals"],
                                  "--transfer-module", transfer, "--head-model", head_model,
                                  "--subdivision", g["subdivision"],
                                  *(["--size", g["size"]] if g.get("size") else [])],
                                 "render_normals", work / "logs" / "render_normals.log", timeout, threads=2)
    return folders, results


def generator_config(recipe, work: Path, shards: Path, codec: Path, codec_sub: str | None, transfer: Path | None,
                     head_model: Path, sidecars: dict, steps: int) -> tuple[Path, dict]:
    """The recipe's generator config (its args applied) with this run's changes; (the YAML written,
    what was changed: key -> (recipe's value, this run's))."""
    import yaml
    cfg = recipe.train_config("generator")
    changed: dict = {}

    def put(path: str, value) -> None:
        node = cfg
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        if node.get(leaf) != value:
            changed[path] = [node.get(leaf), value]
        node[leaf] = value

    trainer, model, data = cfg["trainer"], cfg["model"]["init_args"], cfg["data"]["init_args"]
    strategy = trainer.get("strategy")
    put("trainer.accelerator", "cpu")
    put("trainer.devices", 2)
    if "num_nodes" in trainer:
        put("trainer.num_nodes", 1)
    if isinstance(strategy, dict) and "DeepSpeed" in strategy.get("class_path", ""):
        put("trainer.strategy.class_path", CPU_STRATEGY)          # the GPU recipe's ZeRO stage and init args kept
    else:                                                         # the tiny recipe's 2-process ZeRO-2
        extra = yaml.safe_load((REPO / "configs/train/strategy/deepspeed_cpu.yaml").read_text())["trainer"]
        for key, value in extra.items():
            put(f"trainer.{key}", value)
    put("trainer.max_steps", steps)
    put("trainer.val_check_interval", steps)                      # one validation (+ its samples) at the end
    put("trainer.check_val_every_n_epoch", None)
    put("trainer.log_every_n_steps", 1)
    put("trainer.enable_progress_bar", False)
    for k, cb in enumerate(trainer.get("callbacks") or []):
        if cb["class_path"].endswith("ModelCheckpoint"):
            changed[f"trainer.callbacks[{k}].every_n_train_steps"] = [cb["init_args"].get("every_n_train_steps"), 1]
            cb["init_args"]["every_n_train_steps"] = 1
        if cb["class_path"].endswith("GeneratorSamples"):       # the samples' path, not 30-40 sampler steps
            changed[f"trainer.callbacks[{k}].steps"] = [cb["init_args"].get("steps"), SAMPLE_STEPS]
            cb["init_args"]["steps"] = SAMPLE_STEPS
    overrides = tiny_flavor_overrides(model["flavor"])
    if overrides:
        put("model.init_args.flavor_overrides", {**(model.get("flavor_overrides") or {}), **overrides})
    put("model.init_args.wan_folder", None)
    put("model.init_args.pretrained", None)
    put("model.init_args.codec", str(codec))
    put("model.init_args.codec_subfolder", codec_sub)
    if model.get("transfer_module"):
        put("model.init_args.transfer_module", str(transfer))
    put("model.init_args.head_model", str(head_model))
    put("data.init_args.root", str(shards))
    for kind, folder in sidecars.items():
        put(f"data.init_args.{kind}", str(folder))
    put("data.init_args.batch_size", 1)
    put("data.init_args.num_workers", min(int(data.get("num_workers") or 0), 1))
    put("data.init_args.val_samples", 2)
    put("out", str(work / "generator"))
    cfg["trainer"]["logger"]["init_args"]["tags"] = {"recipe": recipe.name}
    path = work / "generator.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path, changed


def step_reads(log_text: str) -> dict:
    """What the generator's step read, from the lines the task logs once (``GeneratorTask._say``)."""
    latents = ("sidecar" if "latents: precomputed sidecar" in log_text else
               "encoded in the step" if "latents: ENCODED IN THE STEP" in log_text else None)
    normals = ("sidecar" if "driving normals: precomputed sidecar" in log_text else
               "rendered in the step" if "driving normals: RENDERED IN THE STEP" in log_text else "the shards' own")
    return {"latents": latents, "driving_normals": normals}


def strategy_of(config: Path) -> str:
    """The training's strategy in words, from the config written."""
    import yaml
    trainer = yaml.safe_load(config.read_text())["trainer"]
    strategy = trainer["strategy"]
    init = strategy.get("init_args", {}) if isinstance(strategy, dict) else {}
    name = strategy["class_path"].rsplit(".", 1)[-1] if isinstance(strategy, dict) else str(strategy)
    extra = " exclude_frozen_parameters" if init.get("exclude_frozen_parameters") else ""
    return (f"{name} ZeRO-{init.get('stage', '?')}{extra}, {trainer['precision']}, "
            f"{trainer['devices']} CPU processes")


def checkpoint_step(run_dir: Path) -> int | None:
    """``global_step`` of the run's last checkpoint (a DeepSpeed folder or a file)."""
    from training.export import load_checkpoint_state
    last = run_dir / "checkpoints" / "last.ckpt"
    return int(load_checkpoint_state(last)["global_step"]) if last.exists() else None


# -- one recipe --------------------------------------------------------------------------------
def smoke(name: str, args, head_model: Path) -> dict:
    from _report import synthetic_corpus

    from expportrait.recipes import load_recipe
    recipe = load_recipe(name)
    work = args.work / name
    work.mkdir(parents=True, exist_ok=True)
    stages = recipe.preprocess_config().stages
    g = recipe.generator_init()
    size = recipe.training_size()
    res: dict = {"ok": False, "window": int(g["frames"]), "frame_stride": int(g["frame_stride"]), "size": size,
                 "crop_size": stages.crop_size, "segment_frames": stages.segment_frames, "steps": 0,
                 "resumed": False, "flavor": g["flavor"], "minutes": {}}
    minutes = res["minutes"]
    t_all = time.perf_counter()
    try:
        t0 = time.perf_counter()
        corpus = synthetic_corpus(work, args.identities, 1, stages.segment_frames,
                                  min(stages.crop_size, args.corpus_size), args.seed,
                                  stale=("preprocess", "transfer", "codec", "latents", "normals", "generator"), log=log)
        minutes["corpus"] = round((time.perf_counter() - t0) / 60, 2)
        shards = work / "preprocess"
        if args.reuse and (shards / "summary.json").is_file() and any((shards / "shards").glob("*.done.json")):
            log(f"{name}: reusing {shards}")
        else:
            log(f"{name}: preprocessing ({stages.segment_frames}-frame segments, {stages.crop_size}² crops, "
                f"{stages.frame_codec}) on embedded Ray")
            shards, pre = preprocess(recipe, work, corpus, head_model, args.timeout)
            minutes["preprocess"] = pre["minutes"]
            res["preprocess"] = {k: pre.get(k) for k in ("inputs", "ok", "failed", "samples", "shards")}
        transfer = work / "transfer" / "export" / "ema"
        if not (args.reuse and (transfer / "config.json").is_file()):
            log(f"{name}: transfer module ({args.steps} steps)")
            transfer, tr = train_transfer(recipe, work, shards, head_model, args.steps, args.timeout)
            minutes["transfer"] = tr["minutes"]
        codec, codec_sub, res["codec"] = codec_folder(recipe, work, shards, args.timeout)
        log(f"{name}: codec: {res['codec']}")
        t0 = time.perf_counter()
        sidecars, jobs = precompute(recipe, work, shards, codec, codec_sub, transfer, head_model, args.timeout)
        minutes["precompute"] = round((time.perf_counter() - t0) / 60, 2)
        res["precompute"] = {k: {f: v.get(f) for f in ("written", "pending", "samples", "failed")}
                             for k, v in jobs.items()} or "none: the recipe's generator reads no sidecar"
        log(f"{name}: preflight")
        flight = run(["-m", "expportrait.cli", "preflight", "--recipe", name, "--data", shards,
                      "--head-model", head_model,
                      *[a for kind, folder in sidecars.items() for a in (f"--{kind}", folder)]],
                     "preflight", work / "logs" / "preflight.log", args.timeout)
        res["preflight"] = {k: flight.get(k) for k in ("fits", "samples", "frames", "window_span", "crop_size",
                                                       "driving_normals", "latents_codec_id")}
        config, res["changed"] = generator_config(recipe, work, shards, codec, codec_sub, transfer, head_model,
                                                  sidecars, args.steps)
        res["strategy"] = strategy_of(config)
        log(f"{name}: generator: {args.steps} steps, window {g['frames']} every {g['frame_stride']} at {size}², "
            f"2 CPU processes ({config})")
        import shutil
        shutil.rmtree(work / "generator", ignore_errors=True)
        fit = run(["-m", "training.train", "fit", "--config", config], "generator training",
                  work / "logs" / "generator.log", args.timeout)
        minutes["train"] = fit["minutes"]
        res["steps"] = int(fit.get("steps", 0))
        res["step_reads"] = step_reads((work / "logs" / "generator.log").read_text(errors="replace"))
        res["val_loss"] = (fit.get("metrics") or {}).get("val/loss")
        saved = checkpoint_step(work / "generator")
        log(f"{name}: {res['steps']} steps (last checkpoint at step {saved}); resuming for {args.resume_steps}")
        total = args.steps + args.resume_steps
        again = run(["-m", "training.train", "fit", "--config", config, "--ckpt_path", "last",
                     "--trainer.max_steps", total], "resumed training", work / "logs" / "generator_resume.log",
                    args.timeout)
        minutes["resume"] = again["minutes"]
        resumed_log = (work / "logs" / "generator_resume.log").read_text(errors="replace")
        res["resumed_steps"] = int(again.get("steps", 0))
        res["resumed"] = (saved == args.steps and res["resumed_steps"] == total
                          and "Restoring states from the checkpoint" in resumed_log)
        res["train_loss"] = (again.get("metrics") or {}).get("train/loss")
        last = work / "generator" / "checkpoints" / "last.ckpt"           # LoRA: the frozen base left out
        files = [last] if last.is_file() else [f for f in last.rglob("*") if f.is_file()]
        res["checkpoint_kb"] = round(sum(f.stat().st_size for f in files) / 1024, 1)
        res["ok"] = res["steps"] == args.steps and res["resumed"] and bool(flight.get("fits"))
    except StepFailed as exc:
        res["error"] = str(exc).splitlines()[0]
        log(str(exc))
    minutes["total"] = round((time.perf_counter() - t_all) / 60, 2)
    log(f"{name}: ok {res['ok']}, resumed {res['resumed']}, {minutes['total']:.1f} min")
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipe names")
    p.add_argument("--work", default="outputs/bench/recipe_smoke")
    p.add_argument("--identities", type=int, default=3, help="one clip each; split train / val / test by identity")
    p.add_argument("--corpus-size", type=int, default=256, help="corpus frame side (<= the crop size; the "
                                                                   "preprocessing crops to the recipe's size)")
    p.add_argument("--steps", type=int, default=2, help="training steps before the resume")
    p.add_argument("--resume-steps", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed to each command")
    p.add_argument("--reuse", action="store_true", help="reuse a preprocessing output and transfer export in --work")
    args = p.parse_args(argv)
    args.work = (REPO / args.work) if not Path(args.work).is_absolute() else Path(args.work)
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    from expportrait.recipes import recipe_names
    unknown = sorted(set(names) - set(recipe_names()))
    if unknown:
        print(json.dumps({"error": "UsageError", "message": f"unknown recipes {unknown}; known: {recipe_names()}"}))
        return 2
    from models.head.resolve import synthetic_model_file
    t0 = time.perf_counter()
    head_model = Path(synthetic_model_file(seed=0, directory=args.work / "models"))
    log(f"head model: the synthetic SMPL-X-format model {head_model} (the recipes' SMPL-X file is not here)")
    results = {name: smoke(name, args, head_model) for name in names}
    details = args.work / "details.json"           # everything per recipe: changed keys, preflight, jobs
    details.write_text(json.dumps(results, indent=1, default=str))
    headline = {"ok": all(r["ok"] for r in results.values()),
                **{name: {k: r.get(k) for k in HEADLINE if k in r} for name, r in results.items()},
                "minutes": round((time.perf_counter() - t0) / 60, 2), "identities": args.identities,
                "steps": args.steps, "resume_steps": args.resume_steps, "head_model": "synthetic (seed 0)",
                "model_width": f"{TINY_WIDTH_FLAVOR}'s transformer width on the GPU recipes' flavors "
                               f"(LoRA rank {TINY_LORA_RANK}); tiny_cpu: its own flavor",
                "details": str(details), "cpu_count": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2)}
    print(json.dumps(headline))
    from _report import write_result           # benchmarks/results/recipe_smoke.json
    write_result(headline)
    return 0 if headline["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
