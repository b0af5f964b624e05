"""A capacity plan for one recipe and a corpus of N clips: CPU hours to decode, track and fit,
GPU hours to precompute the VAE latents and the driving normal maps and to train, shard and
latent bytes, and the cluster that preprocesses in ``preprocess_days`` and trains in
``train_days``.

Every figure comes from one of three places, and each is printed with where it came from:

- a benchmark's measured result (``benchmarks/results/<name>.json``: the file and its date),
- the recipe (window, size, fps, segment length, frame codec, flavor) and the analytic FLOPs
  of its generator flavor (:mod:`models.generator.flops`),
- a default assumption (an MFU, a compression ratio, ...), printed as such; a missing result
  file falls back to a default that says so.

``make_plan`` returns the figures (and the assumptions); ``format_plan`` the table.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from expportrait.recipes import REPO

RESULTS_DIR = REPO / "benchmarks" / "results"

#: the Wan2.1 VAE encoder: 5.1 MFLOP per pixel-frame, counted with torch's FlopCounterMode on
#: diffusers' ``AutoencoderKLWan()`` (its default config is Wan2.1's) on the meta device at
#: 17x256², 17x512² and 49x512² (5.06-5.13; linear in frames x pixels)
VAE_ENCODE_FLOPS_PER_PIXEL = 5.1e6


@dataclass(frozen=True)
class Assumption:
    """One number the plan uses, its unit and where it came from."""
    key: str
    value: float
    unit: str
    source: str


@dataclass(frozen=True)
class PlanInputs:
    recipe: str
    clips: int
    clip_seconds: float = 10.0
    gpus_per_node: int = 8
    cpus_per_node: int = 96
    gpu: str = "h100"
    epochs: float = 1.0
    preprocess_days: float = 1.0
    train_days: float = 7.0


def _result(name: str, results_dir: Path) -> tuple[dict, str] | None:
    """(results, "benchmarks/results/NAME.json (DATE)") of a benchmark's result file, or None."""
    path = Path(results_dir) / f"{name}.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    results = {**(record.get("results") or {}), "_command": record.get("command") or ""}
    return results, f"measured: {path.name} ({record.get('date', 'undated')})"


def _command_value(found: tuple[dict, str], flag: str, default: float) -> float:
    """A flag's value on the command line the result file records (e.g. ``--frames 24``)."""
    import shlex
    words = shlex.split(found[0].get("_command", ""))
    return float(words[words.index(flag) + 1]) if flag in words[:-1] else default


def cpu_rate(results_dir: Path) -> Assumption:
    """Frames per second one CPU core decodes, tracks and fits (the preprocessing job's path).
    The preprocessing benchmark's 1-worker job (clips/s x its frames per clip) first, else the
    fitting benchmark's ``fps``, else the fitting target (4 frames/s) as a default."""
    found = _result("preprocess", results_dir)
    if found and found[0].get("job1_clips_per_s"):
        results, where = found
        frames = _command_value(found, "--frames", 24.0)   # the benchmark's --frames (its default 24)
        return Assumption("cpu_frames_per_core_s", results["job1_clips_per_s"] * frames, "frames/s per core",
                          f"{where}: job1_clips_per_s x {frames:g} frames per clip (decode + track + fit + "
                          f"render + write, one worker)")
    found = _result("fitting", results_dir)
    if found and found[0].get("fps"):
        results, where = found
        size = f" at {results['size']}² renders" if results.get("size") else ""
        return Assumption("cpu_frames_per_core_s", float(results["fps"]), "frames/s per core",
                          f"{where}: fps (decode + track + fit on the job's path, one process{size}; "
                          f"assumed the same at the recipe's crop size)")
    return Assumption("cpu_frames_per_core_s", 4.0, "frames/s per core",
                      "default assumption (no benchmarks/results/preprocess.json or fitting.json): the fitting "
                      "benchmark's target of 4 frames/s")


def reader_rate(results_dir: Path, latents: bool) -> Assumption:
    """Frames/s one core of the training reader decodes (generator_scale's measurement)."""
    key = "reader_frames_per_core_s_smooth_normals_only" if latents else "reader_frames_per_core_s_noise_h264"
    found = _result("generator_scale", results_dir)
    if found and found[0].get(key):
        return Assumption("reader_frames_per_core_s", float(found[0][key]), "frames/s per core",
                          f"{found[1]}: {key}")
    return Assumption("reader_frames_per_core_s", 60.0, "frames/s per core",
                      "default assumption (no benchmarks/results/generator_scale.json): 60 frames/s per core")


def default_assumptions(gpu: str) -> list[Assumption]:
    """The stated defaults no benchmark here measures."""
    from models.generator.flops import gpu_peak_bf16
    return [
        Assumption("gpu_peak_bf16_tflops", gpu_peak_bf16(gpu) / 1e12, "TFLOP/s",
                   f"{gpu} dense bf16 peak (NVIDIA datasheet; models/generator/flops.py)"),
        Assumption("train_mfu", 0.40, "", "assumed model-FLOPs utilisation of training (not measured: no GPU "
                                          "here; benchmarks/gpu_step.py measures it on one)"),
        Assumption("vae_mfu", 0.25, "", "assumed utilisation of the VAE encode (3D convs; not measured)"),
        Assumption("vae_encode_mflops_per_pixel", VAE_ENCODE_FLOPS_PER_PIXEL / 1e6, "MFLOP per pixel-frame",
                   "counted: FlopCounterMode on diffusers AutoencoderKLWan (meta device), expportrait/plan.py"),
        Assumption("normal_render_frames_per_gpu_s", 2000.0, "frames/s per GPU",
                   "assumed rasterisation + transfer-module rate of the normal precompute on one GPU (not "
                   "measured; head.json's CPU render rate is printed beside it)"),
        Assumption("h264_bits_per_pixel", 1.0, "bit/pixel", "assumed size of a face crop at H.264 CRF ~18 (RGB)"),
        Assumption("lossless_bits_per_pixel", 12.0, "bit/pixel", "assumed size of lossless H.264 RGB (half of raw)"),
        Assumption("cond_deflate_ratio", 0.3, "", "assumed deflate ratio of cond.npz (normals, masks, depth)"),
        Assumption("params_bytes_per_frame", 2000.0, "B/frame", "assumed smplx.npz + offsets.npz + json per frame"),
        Assumption("latent_bytes_per_value", 2.0, "B", "float16 sidecars (pipelines/encode_latents.py)"),
        Assumption("hours_per_day", 24.0, "h", "machines busy around the clock (no queueing, no failures)"),
    ]


def recipe_shape(name: str) -> dict:
    """What the plan needs from the recipe (module doc)."""
    from expportrait.recipes import load_recipe
    from models.generator import flavor
    recipe = load_recipe(name)
    g, stages = recipe.generator_init(), recipe.preprocess_config().stages
    data = recipe.train_config("generator").get("data", {}).get("init_args") or {}
    f = flavor(g["flavor"], **(g.get("flavor_overrides") or {}))
    return {"recipe": recipe.name, "flavor": g["flavor"], "flavor_def": f, "window": int(g["frames"]),
            "frame_stride": int(g["frame_stride"]), "size": recipe.training_size(), "crop": stages.crop_size,
            "fps": float(stages.fps or 25.0), "segment_frames": stages.segment_frames,
            "max_frames": stages.max_frames, "min_frames": stages.min_frames, "codec": stages.frame_codec,
            "render_depth": stages.render_depth, "batch_per_gpu": int(data.get("batch_size") or 1),
            "latents": recipe.needs_latents()}


def clip_shape(shape: dict, clip_seconds: float) -> dict:
    """Frames a clip decodes, the samples it is cut into (preprocessing.clip_stages.segments)
    and the frames they hold."""
    from preprocessing.clip_stages import segments
    frames = int(round(clip_seconds * shape["fps"]))
    if shape["max_frames"] is not None:
        frames = min(frames, shape["max_frames"])
    cut = segments(frames, shape["segment_frames"]) if frames >= shape["min_frames"] else []
    return {"frames_per_clip": frames, "samples_per_clip": len(cut),
            "sample_frames": (cut[0].stop - cut[0].start) if cut else 0}


def sample_bytes(shape: dict, sample_frames: int, a: dict[str, float]) -> dict[str, float]:
    """Shard bytes and latent bytes of one sample (the schema: rgb.mp4 at the frame codec,
    cond.npz deflated, parameters; latents float16 of the frames + reference and of the normals)."""
    from models.generator.flavors import VAE_TIME
    pixels = shape["crop"] ** 2
    bpp = a["h264_bits_per_pixel"] if shape["codec"] == "h264" else a["lossless_bits_per_pixel"]
    cond_raw = 3 + 1 + 1 + 1 + (2 if shape["render_depth"] else 0)   # normals, 2 masks, valid, depth f16
    per_frame = pixels * bpp / 8 + pixels * cond_raw * a["cond_deflate_ratio"] + a["params_bytes_per_frame"]
    f = shape["flavor_def"]
    side = shape["size"] // f.latent_space
    latent_frames = (sample_frames - 1) // VAE_TIME + 1
    one = f.latent_channels * side * side * a["latent_bytes_per_value"]
    return {"shard": per_frame * sample_frames, "latent_frames": one * (latent_frames + 1),   # + reference
            "latent_normals": one * latent_frames}


def gpu_seconds(shape: dict, sample_frames: int, a: dict[str, float]) -> dict[str, float]:
    """GPU seconds per sample: VAE latents of the frames (+ reference), the normal maps
    rendered and encoded, and one training sample at the recipe's window and size."""
    from models.generator.flops import analytic_forward_flops, training_flops
    peak = a["gpu_peak_bf16_tflops"] * 1e12
    vae = VAE_ENCODE_FLOPS_PER_PIXEL * shape["size"] ** 2 / (a["vae_mfu"] * peak)    # s per frame
    fwd = analytic_forward_flops(shape["flavor_def"], shape["window"], shape["size"], shape["size"])
    train = training_flops(shape["flavor_def"], shape["window"], shape["size"], shape["size"])
    return {"latents": vae * (sample_frames + 1),
            "normals": sample_frames * (1 / a["normal_render_frames_per_gpu_s"] + vae),
            "train": train / (a["train_mfu"] * peak), "tokens": fwd["tokens"],
            "forward_flops": fwd["dit"], "train_flops": train}


def collect_assumptions(inputs: PlanInputs, shape: dict, results_dir: Path) -> list[Assumption]:
    """Every number the plan takes from outside the recipe, with its source."""
    out = [Assumption("clip_seconds", inputs.clip_seconds, "s", "--clip-seconds (mean clip length)"),
           cpu_rate(results_dir), reader_rate(results_dir, shape["latents"])]
    out += default_assumptions(inputs.gpu)
    head = _result("head", results_dir)
    if head and head[0].get("render_fps_512"):
        out.append(Assumption("cpu_normal_render_fps_512", float(head[0]["render_fps_512"]), "frames/s",
                              f"{head[1]}: render_fps_512 (for comparison: the CPU renderer)"))
    return out


def make_plan(inputs: PlanInputs, results_dir: Path | None = None) -> dict:
    """The plan's figures (the JSON line) for ``inputs``; ``assumptions`` lists every number
    used with its source (module doc)."""
    if inputs.clips <= 0:
        raise ValueError(f"clips {inputs.clips} must be > 0")
    results_dir = Path(results_dir or os.environ.get("EXPPORTRAIT_BENCH_RESULTS") or RESULTS_DIR)
    shape = recipe_shape(inputs.recipe)
    assumed = collect_assumptions(inputs, shape, results_dir)
    a = {x.key: x.value for x in assumed}
    clip = clip_shape(shape, inputs.clip_seconds)
    samples = inputs.clips * clip["samples_per_clip"]
    per_bytes = sample_bytes(shape, clip["sample_frames"], a)
    per_gpu = gpu_seconds(shape, clip["sample_frames"], a)
    cpu_hours = inputs.clips * clip["frames_per_clip"] / a["cpu_frames_per_core_s"] / 3600
    gpu_hours = {k: samples * per_gpu[k] / 3600 for k in ("latents", "normals")}
    gpu_hours["train"] = samples * inputs.epochs * per_gpu["train"] / 3600
    figures = {"recipe": shape["recipe"], "flavor": shape["flavor"], "clips": inputs.clips, **clip,
               "samples": samples, "window": shape["window"], "size": shape["size"], "gpu": inputs.gpu,
               "epochs": inputs.epochs, "tokens_per_sample": per_gpu["tokens"],
               "forward_tflops_per_sample": per_gpu["forward_flops"] / 1e12,
               "train_tflops_per_sample": per_gpu["train_flops"] / 1e12,
               "cpu_core_hours_preprocess": cpu_hours,
               "gpu_hours_latents": gpu_hours["latents"], "gpu_hours_normals": gpu_hours["normals"],
               "gpu_hours_train": gpu_hours["train"],
               "shard_bytes": samples * per_bytes["shard"],
               "latent_bytes": samples * (per_bytes["latent_frames"] + per_bytes["latent_normals"])}
    figures.update(cluster_shape(inputs, shape, figures, per_gpu["train"], a))
    figures["assumptions"] = {x.key: {"value": x.value, "unit": x.unit, "source": x.source} for x in assumed}
    return figures


def cluster_shape(inputs: PlanInputs, shape: dict, figures: dict, train_s: float, a: dict) -> dict:
    """Nodes that preprocess (CPU) and precompute (GPU) in ``preprocess_days`` and train in
    ``train_days``; the training's global batch and steps; reader cores a GPU needs."""
    hours = a["hours_per_day"]
    cpu_day = inputs.cpus_per_node * hours * inputs.preprocess_days
    cpu_nodes = math.ceil(figures["cpu_core_hours_preprocess"] / cpu_day)
    precompute = figures["gpu_hours_latents"] + figures["gpu_hours_normals"]
    pre_nodes = math.ceil(precompute / (inputs.gpus_per_node * hours * inputs.preprocess_days))
    train_nodes = max(1, math.ceil(figures["gpu_hours_train"] / (inputs.gpus_per_node * hours * inputs.train_days)))
    batch = train_nodes * inputs.gpus_per_node * shape["batch_per_gpu"]
    steps = math.ceil(figures["samples"] * inputs.epochs / batch)
    frames_per_gpu_s = shape["window"] / train_s
    return {"nodes_preprocess_cpu": cpu_nodes, "nodes_precompute_gpu": pre_nodes, "nodes_train_gpu": train_nodes,
            "train_days_at_that_shape": figures["gpu_hours_train"] / (train_nodes * inputs.gpus_per_node * hours),
            "global_batch": batch, "train_steps": steps, "gpu_frames_per_s": frames_per_gpu_s,
            "reader_cores_per_gpu_needed": frames_per_gpu_s / a["reader_frames_per_core_s"],
            "cores_per_gpu_available": inputs.cpus_per_node / inputs.gpus_per_node}


def _gb(n: float) -> str:
    return f"{n / 1e12:,.2f} TB" if n >= 1e12 else f"{n / 1e9:,.2f} GB"


def format_plan(p: dict, inputs: PlanInputs) -> list[str]:
    """The plan as table lines: the recipe's shape, the stages, the cluster, the assumptions."""
    days_pre, days_train = inputs.preprocess_days, inputs.train_days
    rows = [
        ("recipe", f"{p['recipe']} (flavor {p['flavor']}, window {p['window']} frames at {p['size']}², "
                   f"{p['tokens_per_sample']:,} tokens per sample)"),
        ("corpus", f"{p['clips']:,} clips x {p['frames_per_clip']} frames -> {p['samples']:,} samples of "
                   f"{p['sample_frames']} frames ({p['samples_per_clip']} per clip)"),
        ("FLOPs per sample", f"forward {p['forward_tflops_per_sample']:.2f} TF, training "
                             f"{p['train_tflops_per_sample']:.2f} TF (analytic, models/generator/flops.py)"),
        ("CPU decode+track+fit", f"{p['cpu_core_hours_preprocess']:,.0f} core-hours"),
        ("GPU VAE latents", f"{p['gpu_hours_latents']:,.1f} {p['gpu']}-hours (frames + reference)"),
        ("GPU normal precompute", f"{p['gpu_hours_normals']:,.1f} {p['gpu']}-hours (render + encode)"),
        ("GPU training", f"{p['gpu_hours_train']:,.0f} {p['gpu']}-hours ({p['epochs']:g} epoch(s))"),
        ("shard bytes", _gb(p["shard_bytes"])),
        ("latent bytes", f"{_gb(p['latent_bytes'])} (float16 frames + reference + normals)"),
        (f"preprocess in {days_pre:g} d", f"{p['nodes_preprocess_cpu']} CPU node(s) x {inputs.cpus_per_node} "
                                          f"cores + {p['nodes_precompute_gpu']} GPU node(s) x "
                                          f"{inputs.gpus_per_node} {p['gpu']} for the precompute"),
        (f"train in {days_train:g} d", f"{p['nodes_train_gpu']} node(s) x {inputs.gpus_per_node} {p['gpu']} "
                                       f"({p['train_days_at_that_shape']:.2f} d), global batch {p['global_batch']}, "
                                       f"{p['train_steps']:,} steps"),
        ("reader cores per GPU", f"{p['reader_cores_per_gpu_needed']:.1f} needed for {p['gpu_frames_per_s']:.1f} "
                                 f"frames/s, {p['cores_per_gpu_available']:g} available"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"capacity plan: {p['recipe']}, {p['clips']:,} clips of {inputs.clip_seconds:g} s", ""]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    lines += ["", "assumptions (every number not taken from the recipe):"]
    lines += [f"  {k} = {v['value']:g} {v['unit']}".rstrip() + f"  [{v['source']}]"
              for k, v in p["assumptions"].items()]
    return lines


__all__ = ["Assumption", "PlanInputs", "format_plan", "make_plan"]
