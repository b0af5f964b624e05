"""Expression transfer on identities held out of training, two training sources side by side.

    python benchmarks/transfer.py [--work outputs/bench/transfer] [--identities 32 --clips 3
        --frames 24 --size 128] [--epochs 80] [--skip-fitted] [--reuse-models] [--threads 1]

1. A synthetic corpus (split by identity: train / val / test) with exact truth.
2. Two shard sets of the same clips: the exact truth (``training.data.truth_shards``) and the
   preprocessing job's fit (``python -m pipelines.preprocess``).
3. One `transfer_tiny` training per source through the platform's CLI
   (``python -m training.train fit``), timed, one intra-op thread by default (two spin on a
   loaded 2-core host: 3.7 s/step against 1.2 s/step beside other jobs); the EMA export is
   what is evaluated.
4. On the *test* identities' cross-identity pairs of ``pairs.parquet`` (never read in
   training), the error of the target's Δf against the exact target Δf
   (``true_dynamic_offsets``), frame-centred RMSE over the face region (mm), for: the module,
   a direct copy of the driver's Δf, and zero Δf. Each source is evaluated on its own inputs:
   exact (ψ, jaw, β, Δg) for the exact source; the job's fitted ones, and the driver's fitted
   Δf for the copy, for the fitted source. The module gets the driver's (ψ, jaw) and the
   target's neutral mesh, never the target's Δf. Also: the self-transfer error (a driver onto
   its own identity) and the angular error of rendered normal maps (face region, frontal
   camera) against the normal maps of the exact target head.

Last line: one JSON object (``module_vs_copy``: module / copy error on exact offsets, target
≤ 0.5; ``module_vs_copy_fitted``: the same for the fitted source; ``train_minutes``: the
exact source's training wall time, target ≤ 10; ...).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def log(msg: str) -> None:
    print(f"[transfer-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- data -------------------------------------------------------------------------------------
def make_corpus(work: Path, args) -> Path:
    from _report import synthetic_corpus
    return synthetic_corpus(work, args.identities, args.clips, args.frames, args.size, args.seed,
                            stale=("exact", "fitted"), log=log)


def _done(folder: Path) -> bool:
    return (folder / "shards").is_dir() and any((folder / "shards").glob("*.done.json"))


def make_exact_shards(work: Path, corpus: Path, segment: int) -> Path:
    from training.data.truth_shards import write_truth_shards
    out = work / "exact"
    if not _done(out):
        t0 = time.perf_counter()
        write_truth_shards(corpus, out, segment_frames=segment)
        log(f"exact shards in {time.perf_counter() - t0:.0f} s")
    return out


def make_fitted_shards(work: Path, corpus: Path) -> Path:
    """The preprocessing job on the corpus (it skips shards already done)."""
    out = work / "fitted"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pipelines.preprocess", "--config", "configs/preprocess/local.yaml",
                        "--input", str(corpus / "manifest.parquet"), "--output", str(out), "--no-progress"],
                       cwd=REPO, capture_output=True, text=True)
    if r.returncode not in (0, 1):
        raise RuntimeError(f"preprocessing job failed ({r.returncode}): {r.stdout[-2000:]} {r.stderr[-2000:]}")
    log(f"fitted shards (preprocessing job) in {time.perf_counter() - t0:.0f} s: "
        f"{r.stdout.strip().splitlines()[-1][:300]}")
    return out


# -- training ---------------------------------------------------------------------------------
def train(work: Path, source: str, shards: Path, epochs: int, reuse: bool, extra: list[str],
          threads: int = 1) -> tuple[Path, float]:
    out = work / f"train_{source}"
    export = out / "export" / "ema"
    if reuse and (export / "config.json").is_file():
        log(f"{source}: reusing {export}")
        return export, None
    import shutil
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "training.train", "fit", "--config", "configs/train/transfer_tiny.yaml",
           "--data.init_args.root", str(shards), "--out", str(out), "--trainer.max_epochs", str(epochs),
           "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.run_name", f"transfer_tiny_{source}",
           *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    minutes = (time.perf_counter() - t0) / 60
    if r.returncode != 0:
        raise RuntimeError(f"training on {source} failed: {r.stderr[-3000:]}")
    log(f"{source}: trained in {minutes:.2f} min (incl. process start) -> {export}")
    return export, minutes


# -- evaluation inputs ------------------------------------------------------------------------
def exact_inputs(corpus: Path, clip_ids: set[str], identity_ids: set[str]):
    from preprocessing.synthetic.world import load_clip, load_identity
    clips = {}
    for c in clip_ids:
        a = load_clip(corpus, c)
        from preprocessing.synthetic.world import true_dynamic_offsets
        clips[c] = {"expression": a["expression"], "jaw_pose": a["jaw_pose"],
                    "dynamic_offsets": true_dynamic_offsets(corpus, c, c.split("_")[0])}
    ids = {}
    for i in identity_ids:
        ident = load_identity(corpus, i)
        ids[i] = {"betas": ident.betas, "static_offsets": ident.static_offsets}
    return clips, ids


def fitted_inputs(shards: Path, split: str = "test"):
    """Per clip (ψ, jaw, fitted Δf) and per identity (β, Δg) of the job's shards, segments
    concatenated in order."""
    from training.data.datamodule import TRANSFER_FIELDS
    from training.data.shards import ShardDataset, shard_urls
    urls = shard_urls(shards, split)
    total = sum(json.loads(Path(u).with_name(Path(u).stem + ".done.json").read_text())["samples"] for u in urls)
    ds = ShardDataset(urls, total, resampled=False, rank=0, world_size=1, fields=TRANSFER_FIELDS + ("qc",),
                      convert=None)
    segs: dict[str, list] = {}
    ids = {}
    for s in ds:
        clip, ident = s.meta["clip_id"], s.meta["identity_id"]
        segs.setdefault(clip, []).append((s.meta["segment"], s))
        ids.setdefault(ident, {"betas": s.smplx["betas"], "static_offsets": s.static_offsets.astype(np.float32)})
    clips = {}
    for clip, parts in segs.items():
        parts = [p for _, p in sorted(parts, key=lambda x: x[0])]
        clips[clip] = {"expression": np.concatenate([p.smplx["expression"] for p in parts]),
                       "jaw_pose": np.concatenate([p.smplx["jaw_pose"] for p in parts]),
                       "dynamic_offsets": np.concatenate([p.dynamic_offsets.astype(np.float32) for p in parts])}
    return clips, ids


# -- metrics ----------------------------------------------------------------------------------
def centred(x: np.ndarray) -> np.ndarray:
    return x - x.mean(0, keepdims=True)


def sq_err(pred: np.ndarray, truth: np.ndarray) -> tuple[float, int]:
    """Sum of squared frame-centred errors (mm²) and the count of vertex-frames."""
    d = (centred(pred) - centred(truth)) * 1000.0
    return float((d ** 2).sum()), int(d.shape[0] * d.shape[1])


def normal_angle_deg(head, betas, static, dynamic_list, truth, expression, jaw, size: int) -> list[float]:
    """Mean angle (degrees) between the normal maps of the head with each Δf and with the
    true Δf, over face-region pixels, frontal camera."""
    import torch

    from models.head.head_model import HeadParams
    from models.render.camera import portrait_camera
    from models.render.conditions import render_conditions
    t = expression.shape[0]
    params = HeadParams.zeros(t)
    params.betas = torch.as_tensor(betas, dtype=torch.float32).reshape(1, -1)
    params.expression = torch.as_tensor(expression, dtype=torch.float32)
    params.jaw_pose = torch.as_tensor(jaw, dtype=torch.float32)
    cam = portrait_camera((size, size), distance=0.45, target=(0.0, 0.19, 0.0))
    st = torch.as_tensor(static, dtype=torch.float32)

    def maps(d):
        with torch.no_grad():
            v = head(params, st, torch.as_tensor(d, dtype=torch.float32)).vertices.contiguous()
            return render_conditions(v, head.faces, cam, head.face_mask)
    ref = maps(truth)
    mask = (ref.face_mask > 0) & (ref.silhouette > 0)
    out = []
    for d in dynamic_list:
        m = maps(d)
        cos = (m.normals * ref.normals).sum(-1).clamp(-1, 1)
        out.append(float(torch.rad2deg(torch.acos(cos[mask])).mean()))
    return out


def evaluate(corpus: Path, model_dir: Path, clips: dict, ids: dict, pairs, head, render_pairs: int,
             render_size: int, render_frames: int) -> dict:
    import torch

    from models.transfer import ExpressionTransfer
    from models.transfer.inputs import neutral_inputs
    from preprocessing.synthetic.world import true_dynamic_offsets

    model = ExpressionTransfer.from_pretrained(model_dir).eval()
    acc = {k: [0.0, 0] for k in ("module", "copy", "zero", "self_module", "self_zero")}
    normals = {k: [] for k in ("module", "copy", "zero")}
    skipped = 0

    def predict(clip, ident):
        with torch.no_grad():
            neutral, static = neutral_inputs(head, torch.as_tensor(ident["betas"]).float()[None],
                                             torch.as_tensor(ident["static_offsets"]).float()[None])
            return model(torch.as_tensor(clip["expression"]).float()[None],
                         torch.as_tensor(clip["jaw_pose"]).float()[None], neutral, static)[0].numpy()

    def add(key, pred, truth):
        s, n = sq_err(pred, truth)
        acc[key][0] += s
        acc[key][1] += n

    done_self = set()
    for k, p in enumerate(pairs.itertuples()):
        if p.driver_clip_id not in clips or p.target_identity_id not in ids:
            skipped += 1
            continue
        clip, ident = clips[p.driver_clip_id], ids[p.target_identity_id]
        t = clip["expression"].shape[0]
        truth = true_dynamic_offsets(corpus, p.driver_clip_id, p.target_identity_id)[:t]
        pred = predict(clip, ident)
        copy = clip["dynamic_offsets"][:t]
        add("module", pred, truth)
        add("copy", copy, truth)
        add("zero", np.zeros_like(truth), truth)
        if k < render_pairs:
            f = slice(0, render_frames)
            for name, value in zip(("module", "copy", "zero"), normal_angle_deg(
                    head, ident["betas"], ident["static_offsets"], [pred[f], copy[f], np.zeros_like(truth[f])],
                    truth[f], clip["expression"][f], clip["jaw_pose"][f], render_size)):
                normals[name].append(value)
        if p.driver_clip_id not in done_self and p.driver_identity_id in ids:        # self-transfer
            done_self.add(p.driver_clip_id)
            own = true_dynamic_offsets(corpus, p.driver_clip_id, p.driver_identity_id)[:t]
            add("self_module", predict(clip, ids[p.driver_identity_id]), own)
            add("self_zero", np.zeros_like(own), own)
    rmse = {k: (s / max(n, 1)) ** 0.5 for k, (s, n) in acc.items()}
    return {"rmse_mm": rmse, "normal_deg": {k: float(np.mean(v)) if v else float("nan") for k, v in normals.items()},
            "pairs": len(pairs) - skipped, "pairs_skipped": skipped}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / "outputs" / "bench" / "transfer")
    ap.add_argument("--identities", type=int, default=32)
    ap.add_argument("--clips", type=int, default=3)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=80, help="epochs of 64 samples (16 steps of 4)")
    ap.add_argument("--render-pairs", type=int, default=6)
    ap.add_argument("--render-size", type=int, default=160)
    ap.add_argument("--render-frames", type=int, default=8)
    ap.add_argument("--skip-fitted", action="store_true", help="exact offsets only (no preprocessing job)")
    ap.add_argument("--reuse-models", action="store_true", help="evaluate existing exports (no training)")
    ap.add_argument("--threads", type=int, default=2,
                    help="intra-op threads of the training process (2: both cores; on a loaded 2-core host 2 spin "
                         "badly, use 1)")
    ap.add_argument("--train-arg", action="append", default=[],
                    help="extra argument for the training CLI (repeat), e.g. --train-arg=--model.init_args.lr=0.01")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import pandas as pd
    import torch
    torch.set_num_threads(args.threads)

    from models.head.resolve import synthetic_model_file
    from models.head.head_model import PersonalizedHead

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    corpus = make_corpus(work, args)
    sources = {"exact": make_exact_shards(work, corpus, args.frames)}
    if not args.skip_fitted:
        sources["fitted"] = make_fitted_shards(work, corpus)
    world = json.loads((corpus / "world.json").read_text())
    splits = {s: sorted(i for i, v in world["identities"].items() if v["split"] == s) for s in ("train", "val", "test")}
    all_pairs = pd.read_parquet(corpus / "pairs.parquet")
    pairs = all_pairs[all_pairs.split == "test"].reset_index(drop=True)
    val_pairs = all_pairs[all_pairs.split == "val"].reset_index(drop=True)   # held out too (no selection on val)
    assert not set(pairs.target_identity_id) & set(splits["train"]), "test targets must be held out"
    head = PersonalizedHead.from_file(synthetic_model_file(0), subdivision_levels=world["config"]["subdivision"])

    results, minutes = {}, {}
    for name, shards in sources.items():
        model_dir, minutes[name] = train(work, name, shards, args.epochs, args.reuse_models, args.train_arg,
                                          args.threads)
        if name == "exact":
            clips, ids = exact_inputs(corpus, set(pairs.driver_clip_id),
                                      set(pairs.target_identity_id) | set(pairs.driver_identity_id))
        else:
            clips, ids = fitted_inputs(shards, "test")
        results[name] = evaluate(corpus, model_dir, clips, ids, pairs, head, args.render_pairs,
                                 args.render_size, args.render_frames)
        log(f"{name}: {json.dumps(results[name])}")
        if name == "exact":
            vclips, vids = exact_inputs(corpus, set(val_pairs.driver_clip_id),
                                        set(val_pairs.target_identity_id) | set(val_pairs.driver_identity_id))
            results["exact_val"] = evaluate(corpus, model_dir, vclips, vids, val_pairs, head, 0, 0, 0)
            log(f"exact, val pairs: {json.dumps(results['exact_val'])}")

    ex = results["exact"]
    out = {
        "module_vs_copy": ex["rmse_mm"]["module"] / ex["rmse_mm"]["copy"],
        "module_vs_zero": ex["rmse_mm"]["module"] / ex["rmse_mm"]["zero"],
        "copy_vs_zero": ex["rmse_mm"]["copy"] / ex["rmse_mm"]["zero"],
        "self_vs_zero": ex["rmse_mm"]["self_module"] / ex["rmse_mm"]["self_zero"],
        "err_mm_module": ex["rmse_mm"]["module"], "err_mm_copy": ex["rmse_mm"]["copy"],
        "err_mm_zero": ex["rmse_mm"]["zero"], "err_mm_self": ex["rmse_mm"]["self_module"],
        "normal_deg_module": ex["normal_deg"]["module"], "normal_deg_copy": ex["normal_deg"]["copy"],
        "normal_deg_zero": ex["normal_deg"]["zero"],
        "normal_module_vs_copy": ex["normal_deg"]["module"] / ex["normal_deg"]["copy"],
        "train_minutes": minutes["exact"],
        "module_vs_copy_val_pairs": results["exact_val"]["rmse_mm"]["module"] / results["exact_val"]["rmse_mm"]["copy"],
    }
    if "fitted" in results:
        fi = results["fitted"]
        out.update({
            "module_vs_copy_fitted": fi["rmse_mm"]["module"] / fi["rmse_mm"]["copy"],
            "module_vs_zero_fitted": fi["rmse_mm"]["module"] / fi["rmse_mm"]["zero"],
            "copy_vs_zero_fitted": fi["rmse_mm"]["copy"] / fi["rmse_mm"]["zero"],
            "err_mm_module_fitted": fi["rmse_mm"]["module"], "err_mm_copy_fitted": fi["rmse_mm"]["copy"],
            "self_vs_zero_fitted": fi["rmse_mm"]["self_module"] / fi["rmse_mm"]["self_zero"],
            "normal_deg_module_fitted": fi["normal_deg"]["module"],
            "pairs_fitted": fi["pairs"], "train_minutes_fitted": minutes["fitted"]})
    else:
        out["module_vs_copy_fitted"] = None
    out.update({"pairs": ex["pairs"], "identities_train": len(splits["train"]), "identities_test": len(splits["test"]),
                "epochs": args.epochs})
    width = max(len(k) for k in out)
    for k, v in out.items():
        print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    headline = ({k: round(v, 4) if isinstance(v, float) and v == v else (None if isinstance(v, float) else v)
                 for k, v in out.items()} | {"targets": {"module_vs_copy": "<= 0.5", "train_minutes": "<= 10"}})
    print(json.dumps(headline))
    from _report import write_result           # benchmarks/results/transfer.json
    write_result(headline)


if __name__ == "__main__":
    main()
