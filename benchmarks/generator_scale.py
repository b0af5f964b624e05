"""The generator at cluster scale, without weights or GPUs: ``wan1.3b`` and ``wan14b`` built on
the meta device (parameter counts), training FLOPs per sample, the memory each ZeRO stage needs
per GPU, and whether the shard reader keeps a GPU fed.

    python benchmarks/generator_scale.py [--gpus 8] [--cores-per-gpu 8] [--reader-samples 12]

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

Reader headroom = (frames/s one CPU core decodes, measured on shards of 512² samples,
frames + normals) x (cores per GPU) / (frames/s one H100 trains on at 40 % MFU, 1.3B at
33x512², the flavor that eats frames fastest). Two contents: ``random_sample`` of the tests
(white noise: the worst case for the H.264 decoder, a lower bound; this is ``reader_headroom``)
and smooth moving fields (compress like face videos; ``reader_headroom_smooth``), each with
the lossless and the h264 frame codec (the worst codec counts); and normals alone, what the
reader decodes when latents are precomputed (``reader_headroom_normals_only``).
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


def smooth_sample(clip_id: str, frames: int, size: int, seed: int):
    """``random_sample`` with frames and normals replaced by smooth moving fields (low-frequency
    content that compresses like a face video, unlike white noise)."""
    import numpy as np
    from sample_factory import random_sample

    sample = random_sample(clip_id, 0, frames, size, seed=seed)
    rng = np.random.default_rng(seed)
    out = []
    for key in ("frames", "normals"):
        base = torch.from_numpy(rng.random((1, 3, 16, 16), dtype=np.float32))
        video = [torch.nn.functional.interpolate(base.roll(t, 3), size=(size, size), mode="bicubic")[0]
                 for t in range(frames)]
        out.append((torch.stack(video).clamp(0, 1) * 255).byte().permute(0, 2, 3, 1).numpy())
    sample.frames, sample.normals = out
    return sample


def write_shards(root: Path, content: str, codec: str, samples: int, frames: int, size: int) -> float:
    from sample_factory import random_sample

    from preprocessing.shard_format import ShardFolder, plan_shards, write_shard
    from preprocessing.clip_records import ClipItem, ClipOutcome
    from preprocessing.sample_schema import encode_sample

    make = (lambda c, i: random_sample(c, 0, frames, size, seed=i)) if content == "noise" else \
        (lambda c, i: smooth_sample(c, frames, size, seed=i))
    out = ShardFolder(root)
    out.prepare()
    items = [ClipItem(f"c{i}", f"/v/{i}.mp4", f"id{i}") for i in range(samples)]
    t0 = time.perf_counter()
    for spec in plan_shards(items, 4, codec):
        outcomes = [ClipOutcome(c.clip_id, c.identity_id, "train", c.path, "ok",
                                samples=[encode_sample(make(c.clip_id, i), frame_codec=codec)])
                    for i, c in enumerate(spec.clips)]
        write_shard(out, spec, outcomes)
    return time.perf_counter() - t0


def reader_rate(root: Path, samples: int, fields: tuple[str, ...]) -> dict:
    """Frames/s per CPU core of the training reader (``make_loader``, in-process), best of 2."""
    from training.data.shards import make_loader

    best = None
    for _ in range(2):   # the machine is shared: keep the pass with the least CPU time
        loader = make_loader(root / "shards", samples, batch_size=1, num_workers=0, resampled=False,
                             fields=fields)
        c0, w0 = time.process_time(), time.perf_counter()
        n = sum(int(b[fields[0]].shape[1]) for b in loader)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        if best is None or cpu < best[1]:
            best = (n, cpu, wall)
    n, cpu, wall = best
    size_mb = sum(p.stat().st_size for p in (root / "shards").glob("*.tar")) / 1e6
    return {"frames": n, "cpu_s": cpu, "wall_s": wall, "frames_per_core_s": n / cpu, "MB_per_frame": size_mb / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--cores-per-gpu", type=int, default=8, help="CPU cores a GPU node has per GPU")
    ap.add_argument("--reader-samples", type=int, default=12)
    ap.add_argument("--reader-frames", type=int, default=17)
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

    print("\n== shard reader (frames + normals decoded, one process, CPU time) at 512x512 ==")
    gpu_frames = {}
    for name in ("wan1.3b", "wan14b"):
        frames = SHAPES["33x512x512"][0]
        gpu_frames[name] = MFU * H100_BF16 / flops[(name, "33x512x512")] * frames
        print(f"one H100 at 40 % MFU trains {name} on {gpu_frames[name]:.1f} frames/s (33x512² clips)")
    rates: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for content in ("noise", "smooth"):
            for codec in ("lossless", "h264"):
                root = Path(tmp) / f"{content}-{codec}"
                write_s = write_shards(root, content, codec, args.reader_samples, args.reader_frames, 512)
                r = reader_rate(root, args.reader_samples, ("frames", "normals"))
                rates[(content, codec)] = r["frames_per_core_s"]
                print(f"{content:6s} {codec:9s} frames+normals: {r['frames']} frames in {r['cpu_s']:.2f} s CPU "
                      f"({r['wall_s']:.2f} s wall) = {r['frames_per_core_s']:6.1f} frames/s per core, "
                      f"{r['MB_per_frame']:.2f} MB/frame (writing took {write_s:.0f} s)")
                if content == "smooth" and codec == "h264":
                    n = reader_rate(root, args.reader_samples, ("normals",))
                    rates[("smooth", "normals_only")] = n["frames_per_core_s"]
                    print(f"smooth normals only (the path with precomputed latents): "
                          f"{n['frames_per_core_s']:6.1f} frames/s per core")

    def headroom(rate: float, cores: int, name: str = "wan1.3b") -> float:
        return rate * cores / gpu_frames[name]

    noise = min(rates[("noise", c)] for c in ("lossless", "h264"))
    smooth = min(rates[("smooth", c)] for c in ("lossless", "h264"))
    cores = args.cores_per_gpu
    print(f"reader headroom (wan1.3b, {cores} cores per GPU; worst codec): random-noise samples "
          f"{headroom(noise, cores):.1f}x, smooth samples {headroom(smooth, cores):.1f}x, normals only "
          f"(precomputed latents) {headroom(rates[('smooth', 'normals_only')], cores):.1f}x; wan14b: "
          f"{headroom(noise, cores, 'wan14b'):.1f}x / {headroom(smooth, cores, 'wan14b'):.1f}x; "
          f"with 12 / 14 cores per GPU (14: a 112-core 8-GPU node) the noise figure is "
          f"{headroom(noise, 12):.1f}x / {headroom(noise, 14):.1f}x")

    results.update({
        "params_wan1.3b": counts["wan1.3b"]["transformer"],
        "params_wan14b": counts["wan14b"]["transformer"],
        "params_wan14b_clip": counts["wan14b+clip"]["transformer"],
        "trainable_wan14b_lora": counts["wan14b_lora"]["trainable"],
        **{f"reader_frames_per_core_s_{a}_{b}": v for (a, b), v in rates.items()},
        "gpu_frames_per_s_wan1.3b": gpu_frames["wan1.3b"],
        "gpu_frames_per_s_wan14b": gpu_frames["wan14b"],
        "cores_per_gpu": args.cores_per_gpu,
        "reader_headroom": headroom(noise, cores),
        "reader_headroom_smooth": headroom(smooth, cores),
        "reader_headroom_normals_only": headroom(rates[("smooth", "normals_only")], cores),
    })
    headline = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in results.items()}
    headline["targets"] = {"reader_headroom": ">= 10"}
    print(json.dumps(headline))
    from _report import write_result           # benchmarks/results/generator_scale.json
    write_result(headline)


if __name__ == "__main__":
    main()
