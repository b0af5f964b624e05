"""The generator at cluster scale, without weights or GPUs: ``wan1.3b`` and ``wan14b`` built on
the meta device (parameter counts), training FLOPs per sample, the memory each ZeRO stage needs
per GPU, and whether the shard reader keeps a GPU fed.

    python benchmarks/generator_scale.py [--gpus 8] [--cores-per-gpu 12] [--reader-samples 6]

FLOPs: per video token and layer, with d the width, f the FFN width, N video tokens and T
context tokens (multiply-add = 2 FLOPs):

    self-attention   q, k, v, o projections 8d²      scores QKᵀ and AV   4Nd
    cross-attention  q, o projections       4d²      scores to T tokens  4Td   (+ k, v of the
                                                                           context: 4Td²/N)
    FFN              2 · 2·d·f = 4df
    forward / token ≈ L (12d² + 4df + 4Nd + 4Td) + patch/head + the normal encoders' convs

Training = 3 x forward (backward = 2 x forward); + 1 forward with gradient checkpointing. The
formula is checked against torch's ``FlopCounterMode`` on the meta-device model (forward, and
forward + backward), which also counts the 3D normal encoder (full-resolution convs).

Reader headroom: what the wan1.3b recipe's task reads per sample at scale, against what one
H100 consumes. The demand model is printed: from the recipe and its generator config, the
window (frames, stride, size), the frames the reader decodes (the window's span when windows
start at frame 0: ``random_start`` false), the config's DataLoader workers, the cores a GPU gets
on an 8×H100 node with 96 cores (12; a worker is one process on one core: min(workers, cores)
decode), and the H100's samples/s at 40 % MFU (1.3B at 33×512²). The reader's CPU time per
sample is measured on a real 512² synthetic sample (truth shards of the synthetic world, the
recipe's 49-frame segments) with its sidecars: latents (``pipelines.encode_latents``' format)
and the driving normals rendered through a (random) transfer module
(``pipelines.render_normals``' format). ``reader_headroom`` is the at-scale path (sidecar
latents + sidecar normals, no RGB decoded); the RGB path (frames + sidecar normals: the VAE
runs in the step) and the path the config reads today (frames, normals and what re-rendering
needs, whole samples) are printed beside it. ``rerender_s_per_sample_512``: CPU seconds to
re-pose and rasterize one 33-frame window at 512² through the transfer module, what the step
would cost if it rendered (``GeneratorTask.driving_normals`` without sidecars).
Last line: one JSON object (``params_wan1.3b``, ``params_wan14b``, ``reader_headroom`` ...).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "preprocessing"))   # sample_factory

from models.generator import NormalDrivenWan, flavor, latent_shape, token_grid  # noqa: E402
from models.generator.flops import GPU_PEAK_BF16, analytic_forward_flops  # noqa: E402,F401 (one definition)

H100_BF16 = GPU_PEAK_BF16["h100"]   # H100 SXM dense bf16 peak, FLOP/s
MFU = 0.40
SHAPES = {"81x480x832": (81, 480, 832), "33x512x512": (33, 512, 512)}
GiB = 2 ** 30


def param_counts(name: str, **overrides) -> dict:
    with torch.device("meta"):
        m = NormalDrivenWan(flavor(name, **overrides))
    return {"transformer": sum(p.numel() for p in m.transformer.parameters()),
            "conditioning": sum(p.numel() for p in m.conditioning.parameters()),
            "trainable": sum(p.numel() for p in m.trainable_parameters()),
            "total": sum(p.numel() for p in m.parameters())}


def counted_flops(name: str, frames: int, height: int, width: int) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs counted by torch on the meta-device model."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        m = NormalDrivenWan(name)
        t, h, w = latent_shape(frames, height, width)
        x, ref = torch.randn(1, 16, t, h, w), torch.randn(1, 16, t, h, w)
        normals, ref_normal = torch.randn(1, 3, frames, height, width), torch.randn(1, 3, height, width)
        ts = torch.tensor([500.0])
    counter = FlopCounterMode(display=False)
    with counter:
        out = m(x, ts, ref, normals, ref_normal)
    forward = counter.get_total_flops()
    counter = FlopCounterMode(display=False)
    with counter:
        out = m(x, ts, ref, normals, ref_normal)
        out.float().square().mean().backward()
    return float(forward), float(counter.get_total_flops())


def zero_memory(params: int, trainable: int, gpus: int) -> dict[str, float]:
    """GiB per GPU for weights + grads + Adam (bf16 weights and grads, fp32 master + m + v =
    12 B per trainable parameter); frozen parameters (LoRA base) cost bf16 weights only."""
    frozen = params - trainable
    w, g, opt = 2 * params, 2 * trainable, 12 * trainable
    return {"ddp": (w + g + opt) / GiB,
            "zero1": (w + g + opt / gpus) / GiB,
            "zero2": (w + (g + opt) / gpus) / GiB,
            "zero3": ((w + g + opt) / gpus) / GiB,
            "zero3_offload_gpu": ((w + g) / gpus) / GiB,          # optimizer states in CPU RAM
            "zero3_offload_cpu_per_gpu": (opt / gpus) / GiB,
            "frozen_params": frozen}


def activation_gib(name: str, frames: int, height: int, width: int) -> tuple[float, float]:
    """(with, without) checkpointing, GiB, bf16; a rough guide, not a measurement. With block and
    encoder checkpointing: each block's input kept, plus the larger of one block recomputed
    (≈ 34·N·d bytes for attention/norm activations with a fused attention kernel, + the FFN's
    2·N·f·2 bytes) and the driving encoder recomputed (≈ 4 full-resolution and 4 half-resolution
    (F+3)·H·W·width tensors). Without: every block's and the encoder's activations."""
    f = flavor(name)
    t, h, w = token_grid(frames, height, width)
    n = t * h * w
    kept = f.num_layers * n * f.dim * 2
    block = 34 * n * f.dim + 4 * n * f.ffn_dim
    encoder = (4 + 4 / 4) * (frames + 3) * height * width * f.normal_width * 2
    return (kept + max(block, encoder)) / GiB, (f.num_layers * block + encoder) / GiB


def demand_model(recipe_name: str = "wan1.3b") -> dict:
    """What the recipe's generator task reads per sample (module doc)."""
    from expportrait.recipes import load_recipe

    recipe = load_recipe(recipe_name)
    g = recipe.generator_init()
    data = recipe.train_config("generator").get("data", {}).get("init_args") or {}
    stages = recipe.preprocess_config().stages
    span = recipe.window_span()
    return {"recipe": recipe_name, "window": int(g["frames"]), "frame_stride": int(g["frame_stride"]),
            "size": recipe.training_size(), "crop_size": int(stages.crop_size),
            "segment_frames": int(stages.segment_frames), "random_start": bool(g["random_start"]),
            "frames_decoded": span if not g["random_start"] else int(stages.segment_frames),
            "workers": int(data.get("num_workers") or 0), "batch_size": int(data.get("batch_size") or 1)}


def real_sample_shards(root: Path, frames: int, size: int) -> tuple[Path, Path]:
    """Truth shards of a one-clip synthetic world at ``size``² (a sample of ``frames``
    frames) and the synthetic head model: (shards root, head model file)."""
    from models.head.resolve import synthetic_model_file
    from preprocessing.synthetic.world import WorldConfig, generate_corpus
    from training.data.truth_shards import write_truth_shards

    model = synthetic_model_file(seed=0, directory=root / "model")
    generate_corpus(root / "corpus", WorldConfig(identities=1, clips_per_identity=1, frames=frames, size=size,
                                                 seed=0, split_fractions=(1.0, 0.0, 0.0)), model, progress=False)
    write_truth_shards(root / "corpus", root / "shards", segment_frames=frames, clips_per_shard=1)
    return root / "shards", model


def write_sidecars(shards: Path, out: Path, model: Path, window: int) -> float:
    """Latent and normal sidecars of every sample of ``shards`` in the jobs' formats (random
    fp16 latents of the Wan VAE's shape; the normals rendered through a random tiny transfer
    module). Returns the CPU seconds one ``window``-frame render took (the re-render cost)."""
    import numpy as np
    import webdataset as wds

    from models.generator.frames import transfer_normal_maps
    from models.head.head_model import PersonalizedHead
    from models.transfer import ExpressionTransfer
    from preprocessing.latent_schema import LatentSample, encode_latent_sample, latent_frames
    from preprocessing.normal_schema import NormalSample, encode_normal_sample
    from preprocessing.sample_schema import decode_sample
    from preprocessing.shard_format import MARKER_SUFFIX

    head = PersonalizedHead.from_file(model, subdivision_levels=1)
    torch.manual_seed(0)
    module = ExpressionTransfer(num_face_vertices=head.num_face_vertices, flavor="tiny_cpu").eval()
    rerender = None
    for tar in sorted((shards / "shards").glob("*.tar")):
        marker = json.loads(tar.with_name(tar.stem + MARKER_SUFFIX).read_text())
        for kind in ("latents", "normals"):
            (out / kind).mkdir(parents=True, exist_ok=True)
        with wds.TarWriter(str(out / "latents" / tar.name)) as lat, \
                wds.TarWriter(str(out / "normals" / tar.name)) as nrm:
            for raw in wds.DataPipeline(wds.SimpleShardList([str(tar)]), wds.tarfile_to_samples()):
                s = decode_sample(raw, ("frames", "smplx", "static_offsets"))
                smplx = {k: torch.from_numpy(v).float() for k, v in s.smplx.items()}
                static = torch.from_numpy(s.static_offsets)
                if rerender is None:
                    window_smplx = {k: (v if k == "betas" else v[:window]) for k, v in smplx.items()}
                    c0 = time.process_time()
                    transfer_normal_maps(head, module, window_smplx, static, s.frames.shape[1], None)
                    rerender = time.process_time() - c0
                maps = transfer_normal_maps(head, module, smplx, static, s.frames.shape[1], None)
                nrm.write(encode_normal_sample(NormalSample(s.key, maps.numpy(), {})))
                t, h = latent_frames(len(s.frames)) // 4 + 1, s.frames.shape[1] // 8
                z = np.random.default_rng(0).standard_normal((2, 16, t, h, h)).astype(np.float16)
                lat.write(encode_latent_sample(LatentSample(s.key, z[0], z[1], {})))
        for kind in ("latents", "normals"):
            (out / kind / f"{tar.stem}{MARKER_SUFFIX}").write_text(json.dumps({"source_sha256": marker["sha256"]}))
    return rerender


def reader_rate(root: Path, samples: int, **reader) -> dict:
    """Samples/s per CPU core of the training reader (``make_loader``, in-process), best of 2."""
    from training.data.shards import make_loader

    best = None
    for _ in range(2):   # the machine is shared: keep the pass with the least CPU time
        loader = make_loader(root / "shards", samples, batch_size=1, num_workers=0, resampled=False, **reader)
        c0, w0 = time.process_time(), time.perf_counter()
        n = sum(1 for _ in loader)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        if best is None or cpu < best[1]:
            best = (n, cpu, wall)
    n, cpu, wall = best
    return {"samples": n, "cpu_s": cpu, "wall_s": wall, "samples_per_core_s": n / cpu}


def reader_section(args: argparse.Namespace, flops: dict, results: dict) -> None:
    """The reader against the GPU (module doc); fills ``results``."""
    demand = demand_model()
    label = f"{demand['window']}x{demand['size']}x{demand['size']}"
    if (("wan1.3b", label)) not in flops:
        flops[("wan1.3b", label)] = counted_flops("wan1.3b", demand["window"], demand["size"], demand["size"])[1]
    gpu_samples = MFU * H100_BF16 / flops[("wan1.3b", label)]
    cores = min(demand["workers"], args.cores_per_gpu)
    print(f"\n== reader against one H100 (demand model of the {demand['recipe']} recipe) ==")
    print(f"demand model: window {demand['window']} frames every {demand['frame_stride']} at {demand['size']}² "
          f"(crop {demand['crop_size']}², segments of {demand['segment_frames']}, random_start "
          f"{demand['random_start']}: {demand['frames_decoded']} frames decoded per sample), "
          f"{demand['workers']} DataLoader workers, {args.cores_per_gpu} cores per GPU (96-core 8×H100 node) "
          f"-> {cores} decoding processes; one H100 at 40 % MFU trains {gpu_samples:.2f} samples/s")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        shards, model = real_sample_shards(tmp / "real", demand["segment_frames"], demand["crop_size"])
        rerender = write_sidecars(shards, tmp / "side", model, demand["window"])
        print(f"(a real {demand['segment_frames']}-frame {demand['crop_size']}² sample and its sidecars written "
              f"in {time.perf_counter() - t0:.0f} s)")
        side = {"latents": str(tmp / "side" / "latents"), "normals": str(tmp / "side" / "normals")}
        window = demand["frames_decoded"]
        paths = {
            "sidecars": dict(fields=(), max_frames=window, **side),
            "frames_sidecar_normals": dict(fields=("frames",), max_frames=window, normals=side["normals"]),
            "config_today": dict(fields=("frames", "normals", "smplx", "static_offsets", "face_vertex_ids")),
        }
        headrooms = {}
        for name, reader in paths.items():
            r = reader_rate(shards, args.reader_samples, split=None, **reader)
            headrooms[name] = r["samples_per_core_s"] * cores / gpu_samples
            print(f"{name:24s} {r['samples_per_core_s']:6.2f} samples/s per core ({r['cpu_s'] / r['samples']:.3f} s "
                  f"CPU per sample) -> headroom {headrooms[name]:.1f}x")
    step_re = rerender + 1 / gpu_samples
    print(f"re-rendering the driving normals in the step: {rerender:.2f} s CPU per {demand['window']}-frame "
          f"{demand['crop_size']}² sample (the GPU needs {1 / gpu_samples:.2f} s): a step would take "
          f"{step_re:.2f} s, the GPU busy {100 / gpu_samples / step_re:.0f} % of it")
    results.update({"demand_model": demand, "cores_per_gpu": args.cores_per_gpu, "decoding_processes": cores,
                    "gpu_samples_per_s_wan1.3b": gpu_samples, "reader_headroom": headrooms["sidecars"],
                    "reader_headroom_frames_sidecar_normals": headrooms["frames_sidecar_normals"],
                    "reader_headroom_config_today": headrooms["config_today"],
                    "rerender_s_per_sample_512": rerender})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--cores-per-gpu", type=int, default=12, help="CPU cores per GPU (96-core 8xH100 node: 12)")
    ap.add_argument("--reader-samples", type=int, default=6)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    results: dict = {}

    print("== parameters (meta device; transformer = diffusers WanTransformer3DModel, I2V in 36) ==")
    counts = {name: param_counts(name) for name in ("wan1.3b", "wan14b", "wan14b_lora")}
    counts["wan14b+clip"] = param_counts("wan14b", clip=True)
    for name, c in counts.items():
        print(f"{name:12s} transformer {c['transformer'] / 1e9:7.3f} B  normal encoders + context "
              f"{c['conditioning'] / 1e6:6.2f} M  trainable {c['trainable'] / 1e9:7.3f} B")
    print("published: Wan2.1-T2V-1.3B '1.3B' (its transformer: 1.419 B), Wan2.1-T2V-14B '14B' (14.289 B),"
          " Wan2.1-I2V-14B with the CLIP path 16.4 B")

    print("\n== training FLOPs per sample (1 clip): analytic DiT formula vs torch's FlopCounterMode ==")
    print(f"{'flavor':8s} {'shape':12s} {'tokens':>7s} {'attn share':>10s} {'DiT fwd TF':>10s} "
          f"{'counted fwd':>11s} {'counted f+b':>11s} {'3x fwd TF':>13s} {'+ckpt TF':>9s} {'s/sample@40%':>12s}")
    flops: dict = {}
    for name in ("wan1.3b", "wan14b"):
        for label, shape in SHAPES.items():
            a = analytic_forward_flops(name, *shape)
            fwd, fwdbwd = counted_flops(name, *shape)
            train = fwdbwd
            flops[(name, label)] = train
            results[f"train_tflops_{name}_{label}"] = train / 1e12
            print(f"{name:8s} {label:12s} {a['tokens']:7d} {a['attention_share']:10.2f} {a['dit'] / 1e12:10.1f} "
                  f"{fwd / 1e12:11.1f} {fwdbwd / 1e12:11.1f} {3 * fwd / 1e12:13.1f} {4 * fwd / 1e12:9.1f} "
                  f"{train / (MFU * H100_BF16):12.2f}")
    print("(torch counts backward = 2.0x forward here, so the counted f+b is the 3x rule)")

    print(f"\n== memory per GPU, {args.gpus} GPUs, bf16 weights/grads + fp32 Adam (GiB; activations separate) ==")
    print(f"{'model':12s} {'DDP':>7s} {'ZeRO-1':>7s} {'ZeRO-2':>7s} {'ZeRO-3':>7s} {'Z3+offl GPU':>11s} "
          f"{'CPU/GPU':>8s}")
    for name, c in counts.items():
        if name == "wan14b+clip":
            continue
        mem = zero_memory(c["total"], c["trainable"], args.gpus)
        results[f"zero2_gib_{name}"] = mem["zero2"]
        results[f"zero3_gib_{name}"] = mem["zero3"]
        print(f"{name:12s} {mem['ddp']:7.1f} {mem['zero1']:7.1f} {mem['zero2']:7.1f} {mem['zero3']:7.1f} "
              f"{mem['zero3_offload_gpu']:11.1f} {mem['zero3_offload_cpu_per_gpu']:8.1f}")
    for name in ("wan1.3b", "wan14b"):
        for label, shape in SHAPES.items():
            ckpt, full = activation_gib(name, *shape)
            print(f"activations per sample, {name} {label}: ~{ckpt:.1f} GiB with checkpointing, "
                  f"~{full:.0f} GiB without")
    print("-> wan1.3b: ZeRO-2 fits 80 GB; wan14b full fine-tune: ZeRO-3 (+ optimizer offload to be safe);"
          " wan14b_lora: ZeRO-2/3 with the frozen base in bf16")

    reader_section(args, flops, results)
    results.update({
        "params_wan1.3b": counts["wan1.3b"]["transformer"],
        "params_wan14b": counts["wan14b"]["transformer"],
        "params_wan14b_clip": counts["wan14b+clip"]["transformer"],
        "trainable_wan14b_lora": counts["wan14b_lora"]["trainable"],
    })
    headline = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in results.items()}
    headline["targets"] = {"reader_headroom": ">= 10"}
    print(json.dumps(headline))
    from _report import write_result           # benchmarks/results/generator_scale.json
    write_result(headline)


if __name__ == "__main__":
    main()
