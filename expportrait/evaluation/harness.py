"""The evaluation harness: pairs from a data folder, the model and the copy-reference baseline
run on each, metrics per pair and overall, side-by-side videos.

Protocols
- ``self``: a clip drives its own first frame; the clip is the ground truth, scored from frame 1
  on (frame 0 is the reference itself). PSNR, SSIM, L1 (LPIPS with a local backbone) against it,
  CSIM to the source, AED/APD against the ground truth's fit, jitter relative to the ground truth's own, identity drift.
- ``cross``: the first frame of one identity's clip driven by another identity's clip; no
  ground truth: CSIM to the source, AED/APD against the driver's fit, jitter relative to the
  driver's, identity drift.

Data folders: a synthetic corpus (``manifest.parquet``: clips of the held-out ``test`` identities
when there are any, exact parameters, no fitting) or a folder of real videos (and, for
``cross``, images as extra sources), fitted on the fly.

The **copy-reference baseline** repeats the source reference frame: the number any generator
must beat on the pixel metrics (it has perfect identity and no motion).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .metrics import identity_drift, nanmean, per_frame_psnr, pixel_metrics, temporal_jitter

VIDEO_SUFFIXES = {".mp4", ".mov", ".avi", ".mkv", ".webm"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass
class Pair:
    name: str
    source: str
    driving: str


@dataclass
class EvalOptions:
    max_pairs: int = 4
    max_frames: int | None = None
    lpips_backbone: str | None = None
    dlib: bool = True                 # dlib second opinion
    motion: bool = True               # AED/APD (fits each generated video)
    identity_stride: int = 1          # identity embedding every n-th frame


def make_pairs(data: str | Path, protocol: str, max_pairs: int = 4) -> list[Pair]:
    """(source, driving) pairs of a data folder for ``protocol`` (module doc)."""
    data = Path(data)
    if protocol not in ("self", "cross"):
        raise ValueError(f"protocol {protocol!r}: use self or cross")
    if (data / "manifest.parquet").is_file():
        import pandas as pd
        m = pd.read_parquet(data / "manifest.parquet")
        held = m[m["split"] == "test"] if (m["split"] == "test").any() else m
        clips = [(r.identity_id, str(data / r.ground_truth)) for r in held.itertuples()]
        if protocol == "cross" and held["identity_id"].nunique() < 2:
            clips = [(r.identity_id, str(data / r.ground_truth)) for r in m.itertuples()]
    elif data.is_dir():
        files = sorted(p for p in data.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES | IMAGE_SUFFIXES)
        clips = [(p.stem, str(p)) for p in files]
    else:
        raise FileNotFoundError(f"evaluation data folder not found: {data}")
    videos = [c for c in clips if Path(c[1]).suffix.lower() not in IMAGE_SUFFIXES]
    if not videos:
        raise ValueError(f"{data}: no clips or videos to drive with")
    pairs = []
    if protocol == "self":
        pairs = [Pair(f"self_{Path(p).stem}", p, p) for _, p in videos]
    else:
        for i, (ident, src) in enumerate(clips):
            drivers = [c for c in videos[i + 1:] + videos[:i + 1] if c[0] != ident]
            if drivers:
                pairs.append(Pair(f"cross_{Path(src).stem}__{Path(drivers[0][1]).stem}", src, drivers[0][1]))
        if not pairs:
            raise ValueError(f"{data}: cross needs clips of at least two identities")
    return pairs[:max_pairs]


@dataclass
class PairResult:
    name: str
    source: str
    driving: str
    status: str = "ok"
    message: str = ""
    model: dict = field(default_factory=dict)
    copy: dict = field(default_factory=dict)
    curves: dict = field(default_factory=dict)          # per-frame series for plots
    video: str | None = None
    seconds: float = 0.0


def score_video(frames: np.ndarray, source: np.ndarray, protocol: str, truth: np.ndarray | None,
                motion_ref: np.ndarray, head, opts: EvalOptions, fps: float, ref_fit=None) -> tuple[dict, dict, object]:
    """Metrics of one generated (or baseline) video: (scalars, per-frame curves, reference fit)."""
    from .identity import similarity_to
    from .lpips import lpips_score
    out, curves = {}, {}
    if protocol == "self" and truth is not None:
        out.update(pixel_metrics(frames, truth))
        out["lpips"] = lpips_score(frames, truth, opts.lpips_backbone)["lpips"]
        curves["psnr"] = per_frame_psnr(frames, truth).tolist()
    jit = temporal_jitter(frames, motion_ref)
    out.update(jitter=jit["jitter"], jitter_ratio=jit.get("jitter_ratio", math.nan))
    sf = similarity_to(source, frames, "sface", opts.identity_stride)
    out["csim_sface"] = nanmean(sf)
    out["face_found_frac"] = float(np.isfinite(sf).mean())
    curves["csim_sface"] = [None if not np.isfinite(v) else float(v) for v in sf]
    out.update({k: v for k, v in identity_drift(sf, fps).items() if k != "frames_with_face"})
    if opts.dlib:
        out["dlib_distance"] = nanmean(similarity_to(source, frames, "dlib", max(opts.identity_stride, 2)))
    if opts.motion:
        from .motion import aed_apd
        m, ref_fit = aed_apd(frames, motion_ref, head, ref_fit)
        out.update(aed=m["aed"], apd_deg=m["apd_deg"], apd_motion_deg=m["apd_motion_deg"])
        out["fit_status"] = m["fit_status"]
    return out, curves, ref_fit


def evaluate_pairs(reenactor, pairs: list[Pair], protocol: str, out: str | Path, opts: EvalOptions,
                   progress: bool = True) -> list[PairResult]:
    """Run the model and the copy baseline on every pair; write side-by-side videos."""
    from tqdm.auto import tqdm

    from expportrait.reenactment import side_by_side
    from preprocessing.video import write_video
    out = Path(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    head = reenactor.head.cpu()
    results = []
    for pair in tqdm(pairs, desc=f"evaluate ({protocol})", disable=not progress):
        t0 = time.perf_counter()
        r = PairResult(pair.name, pair.source, pair.driving)
        try:
            source = reenactor.subject(pair.source, max_frames=1)
            driving = reenactor.driving_subject(pair.driving, max_frames=opts.max_frames)
            res = reenactor.reenact(source, driving)
        except (ValueError, FileNotFoundError, OSError) as exc:
            r.status, r.message = "failed", f"{type(exc).__name__}: {exc}"
            results.append(r)
            continue
        truth = res.driving if protocol == "self" else None
        # self: the clip's frame 0 is the source reference itself (copying it is exact there): scored
        # from frame 1 on, for the model and the baseline alike
        first = 1 if protocol == "self" and len(res.frames) > 3 else 0
        gen, drv = res.frames[first:], res.driving[first:]
        copy = np.repeat(res.reference[None], len(gen), 0)
        r.model, r.curves, ref_fit = score_video(gen, res.reference, protocol, None if truth is None else drv, drv,
                                                 head, opts, driving.fps)
        r.copy, copy_curves, _ = score_video(copy, res.reference, protocol, None if truth is None else drv, drv,
                                             head, opts, driving.fps, ref_fit)
        r.curves = {"model": r.curves, "copy": copy_curves}
        panels = side_by_side(res)
        if truth is not None:
            panels = np.concatenate([panels, truth], axis=2)
        r.video = str(write_video(out / "videos" / f"{pair.name}.mp4", panels, driving.fps or 25.0))
        r.seconds = round(time.perf_counter() - t0, 2)
        r.model["generate_s_per_frame"] = res.seconds.get("generate", math.nan) / max(1, len(res.frames))
        results.append(r)
    return results


SUMMARY_KEYS = ("psnr", "ssim", "l1", "lpips", "csim_sface", "dlib_distance", "aed", "apd_deg", "apd_motion_deg",
                "jitter", "jitter_ratio", "drift_per_s", "drift_first_last", "face_found_frac", "generate_s_per_frame")


def summarize(results: list[PairResult]) -> dict:
    """Means over the evaluated pairs for the model and the copy baseline, and model − copy."""
    ok = [r for r in results if r.status == "ok"]
    summary = {"pairs": len(results), "pairs_ok": len(ok), "pairs_failed": len(results) - len(ok),
               "model": {}, "copy": {}}
    for who in ("model", "copy"):
        for k in SUMMARY_KEYS:
            vals = [getattr(r, who).get(k) for r in ok]
            vals = [v for v in vals if isinstance(v, (int, float))]
            if vals:
                summary[who][k] = nanmean(vals)
    for k in ("psnr", "ssim", "l1", "lpips", "csim_sface", "aed", "apd_deg", "apd_motion_deg"):
        a, b = summary["model"].get(k), summary["copy"].get(k)
        if a is not None and b is not None:
            summary["model"][f"{k}_vs_copy"] = a - b
    summary["psnr_capped"] = any(r.model.get("psnr_capped") or r.copy.get("psnr_capped") for r in ok)
    return summary


def write_results(results: list[PairResult], summary: dict, out: str | Path) -> None:
    out = Path(out)
    rows = [{"pair": r.name, "source": r.source, "driving": r.driving, "status": r.status, "message": r.message,
             "seconds": r.seconds, "video": r.video, **{f"model.{k}": v for k, v in r.model.items()},
             **{f"copy.{k}": v for k, v in r.copy.items()}} for r in results]
    import pandas as pd
    pd.DataFrame(rows).to_csv(out / "pairs.csv", index=False)
    (out / "metrics.json").write_text(json.dumps(finite(summary), indent=2))


def finite(x):
    """``x`` with NaN/inf floats replaced by None (valid JSON)."""
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
