"""The HTML report a person opens in a browser: the summary table (model next to the
copy-reference baseline), matplotlib plots, per-pair rows and side-by-side ``<video>`` players.
Everything is relative to the report folder, so the folder can be copied or logged to MLflow."""
from __future__ import annotations

import html
import math
import os
from pathlib import Path

from .harness import PairResult

LABELS = {
    "psnr": ("PSNR (dB) ↑", "torchmetrics, per frame, capped at 100 dB"),
    "ssim": ("SSIM ↑", "torchmetrics"),
    "l1": ("L1 ↓", "mean |Δ| in [0, 1] units"),
    "lpips": ("LPIPS ↓", "AlexNet, local backbone"),
    "csim_sface": ("CSIM SFace ↑", "cosine to the source; SFace (OpenCV zoo), not ArcFace"),
    "dlib_distance": ("identity distance dlib ↓", "second opinion; dlib ResNet; < 0.6 same person"),
    "aed": ("AED ↓", "expression distance, our fitter (ψ[:50] + jaw)"),
    "apd_deg": ("APD (°) ↓", "head-pose angle, our fitter"),
    "apd_motion_deg": ("APD motion (°) ↓", "head rotation since the first frame, our fitter (what is retargeted)"),
    "jitter": ("jitter ↓", "mean |2nd temporal difference|"),
    "jitter_ratio": ("jitter ratio", "vs the ground truth's (self) / driver's (cross) own"),
    "drift_per_s": ("identity drift /s", "slope of per-frame SFace CSIM (negative: drifting)"),
    "drift_first_last": ("drift first−last", "mean CSIM, first minus last quarter"),
    "face_found_frac": ("face found", "fraction of frames SFace's detector finds a face in"),
    "generate_s_per_frame": ("s / frame", "generation time per frame"),
}


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))


def plots(results: list[PairResult], summary: dict, out: Path, protocol: str) -> list[str]:
    """PNG plots under ``out/plots``; their paths relative to ``out``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    (out / "plots").mkdir(parents=True, exist_ok=True)
    files = []
    ok = [r for r in results if r.status == "ok"]
    series = [("csim_sface", "SFace CSIM to the source (identity over time)")]
    if protocol == "self":
        series.insert(0, ("psnr", "PSNR per frame (dB)"))
    for key, title in series:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        for r in ok:
            for who, style in (("model", "-"), ("copy", ":")):
                y = r.curves.get(who, {}).get(key)
                if y:
                    ax.plot([math.nan if v is None else v for v in y], style, label=f"{r.name} ({who})")
        ax.set_title(title)
        ax.set_xlabel("frame")
        if ax.get_legend_handles_labels()[0]:               # no curve (e.g. no face found): no legend
            ax.legend(fontsize=6, loc="best")
        fig.tight_layout()
        path = out / "plots" / f"{key}_per_frame.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(os.path.relpath(path, out))
    keys = [k for k in ("psnr", "ssim", "l1", "csim_sface", "aed", "apd_deg", "apd_motion_deg", "jitter_ratio")
            if k in summary["model"] or k in summary["copy"]]
    if keys:
        fig, axes = plt.subplots(1, len(keys), figsize=(2.1 * len(keys), 2.8))
        for ax, k in zip(list(axes) if len(keys) > 1 else [axes], keys):
            vals = [summary["model"].get(k, math.nan), summary["copy"].get(k, math.nan)]
            ax.bar(["model", "copy"], [0 if not math.isfinite(v) else v for v in vals], color=["#3b7dd8", "#aaaaaa"])
            ax.set_title(LABELS.get(k, (k,))[0], fontsize=8)
            ax.tick_params(labelsize=7)
        fig.tight_layout()
        path = out / "plots" / "model_vs_copy.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(os.path.relpath(path, out))
    return files


def write_report(results: list[PairResult], summary: dict, out: str | Path, meta: dict) -> Path:
    """``out/report.html`` (see the module doc)."""
    out = Path(out)
    protocol = meta.get("protocol", "self")
    images = plots(results, summary, out, protocol)
    keys = [k for k in LABELS if k in summary["model"] or k in summary["copy"]]
    rows = "".join(
        f"<tr><td title='{html.escape(LABELS[k][1])}'>{html.escape(LABELS[k][0])}</td>"
        f"<td>{_fmt(summary['model'].get(k))}</td><td>{_fmt(summary['copy'].get(k))}</td>"
        f"<td>{_fmt(summary['model'].get(k + '_vs_copy'))}</td><td class=note>{html.escape(LABELS[k][1])}</td></tr>"
        for k in keys)
    panels = "reference | driving | driving normals (source identity) | generated" + \
             (" | ground truth" if protocol == "self" else "")
    pair_html = []
    for r in results:
        if r.status != "ok":
            pair_html.append(f"<div class=pair><h3>{html.escape(r.name)} — <span class=bad>failed</span></h3>"
                             f"<p>{html.escape(r.message)}</p></div>")
            continue
        cells = "".join(f"<td>{_fmt(r.model.get(k))}</td><td>{_fmt(r.copy.get(k))}</td>" for k in keys[:8])
        head = "".join(f"<th colspan=2>{html.escape(LABELS[k][0])}</th>" for k in keys[:8])
        video = os.path.relpath(r.video, out) if r.video else ""
        pair_html.append(
            f"<div class=pair><h3>{html.escape(r.name)}</h3><p class=note>source {html.escape(r.source)}<br>"
            f"driving {html.escape(r.driving)}</p>"
            f"<video src='{html.escape(video)}' controls loop muted autoplay playsinline class=vid></video>"
            f"<p class=note>{panels}</p><table><tr>{head}</tr><tr>{'<th>model</th><th>copy</th>' * len(keys[:8])}</tr>"
            f"<tr>{cells}</tr></table></div>")
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in meta.get("notes", []))
    info = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in meta.items() if k != "notes")
    page = f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>ExpPortrait evaluation — {html.escape(protocol)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1200px; color: #222; }}
table {{ border-collapse: collapse; margin: .5em 0; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; font-size: 13px; }}
.note {{ color: #666; font-size: 12px; }} .bad {{ color: #b00; }}
.vid {{ width: 100%; max-width: 1100px; image-rendering: pixelated; background: #000; }}
.pair {{ margin: 1.5em 0; padding-top: .5em; border-top: 1px solid #ddd; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>ExpPortrait evaluation — protocol <code>{html.escape(protocol)}</code></h1>
<table>{info}</table>
<h2>Summary (mean over {summary['pairs_ok']} of {summary['pairs']} pairs)</h2>
<table><tr><th>metric</th><th>model</th><th>copy-reference baseline</th><th>model − copy</th><th>how</th></tr>
{rows}</table>
<ul class=note>{notes}</ul>
<h2>Plots</h2>
{''.join(f"<p><img src='{html.escape(p)}' alt='{html.escape(p)}'></p>" for p in images)}
<h2>Pairs</h2>
{''.join(pair_html)}
</body></html>
"""
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
