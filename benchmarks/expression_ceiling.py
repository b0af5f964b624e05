"""How much of the true expression a detector's 2D points carry: a learned linear read-out of ψ.

    python benchmarks/expression_ceiling.py [--identities 40 --frames 48 --seed 1002]
                                            [--eval-clips 3 --eval-seed 3]

Why: the fitting benchmark's `psi_corr` (fitted ψ[:10] against the true ones, per clip) stays
near 0.27 on the job's path while the same fitter given the true landmarks reaches ~0.7. This
script asks whether the detector's points hold more ψ than the fit gets out of them, without
any fitting: a ridge regression from a frame's 2D points (similarity-normalized per frame: no
position, scale or in-plane rotation) straight to the true ψ[:10], **trained** on synthetic
calibration identities (their own seed, as the landmark calibration's; rendered, encoded,
decoded and tracked exactly as the job does: ``preprocessing.landmark_calibration.collect``)
and **scored** on the fitting benchmark's clips (seed 3, 3 clips × 48 frames at 256²: the same
renders), which it never trains or tunes on (the ridge weight is chosen by identity-grouped
cross-validation on the calibration identities). Scored the way the fitting benchmark scores
`psi_corr`: per clip, the correlation of ψ[:10] over all frames and coefficients; the mean.

The same read-out is trained on three inputs, side by side:

- ``psi_corr_mediapipe478``: all 478 MediaPipe points (what the tracker sees);
- ``psi_corr_mediapipe68``: the 68 of them the fitter uses;
- ``psi_corr_true68``: the model's own 68 points projected from the true mesh (an oracle: no
  detector), showing how much ψ 2D points can carry on this world;

plus the learning curve of the 478-point read-out (``psi_corr_mediapipe478_by_identities``:
more calibration identities, same evaluation) and the per-coefficient correlations (pooled over
the evaluation frames). A linear read-out is not the best possible estimator (a kernel ridge
read-out was tried and did worse: it learns the identities); it is a fitter-free measure of what
the points hold. Last line JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import report  # noqa: E402
from benchmarks.fitting import PSI_COEFFS as COEFFS  # noqa: E402
from benchmarks.fitting import psi_corr  # noqa: E402

ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0)


def normalize(points: np.ndarray, reference: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(F, L, 2) points -> per-frame similarity-normalized (centred, unit RMS radius, rotated onto
    ``reference``; the reference is the Procrustes mean of ``points`` when not given)."""
    x = points - points.mean(1, keepdims=True)
    x = x / np.sqrt((x ** 2).sum((1, 2), keepdims=True) / x.shape[1])
    if reference is None:
        reference = x.mean(0)
        for _ in range(3):
            reference = _rotate_onto(x, reference).mean(0)
            reference /= np.sqrt((reference ** 2).sum() / len(reference))
    return _rotate_onto(x, reference), reference


def _rotate_onto(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(np.einsum("fli,lj->fij", x, reference))
    d = np.sign(np.linalg.det(u @ vt))
    u[:, :, -1] *= d[:, None]
    return x @ (u @ vt)


def clip_psi_corr(pred: np.ndarray, true: np.ndarray, clip: np.ndarray) -> float:
    """The fitting benchmark's `psi_corr` of each clip (frames grouped by ``clip``), averaged."""
    return float(np.mean([psi_corr(pred[clip == c], true[clip == c]) for c in np.unique(clip)]))


class Readout:
    """Ridge regression from normalized, standardized 2D points to ψ[:COEFFS]."""

    def __init__(self, points: np.ndarray, psi: np.ndarray, alpha: float) -> None:
        self.alpha = alpha
        x, self.reference = normalize(points)
        x = x.reshape(len(x), -1)
        self.mean, self.std = x.mean(0), x.std(0) + 1e-9
        x = (x - self.mean) / self.std
        self.psi_mean = psi.mean(0)
        self.weights = np.linalg.solve(x.T @ x + alpha * np.eye(x.shape[1]), x.T @ (psi - self.psi_mean))

    def __call__(self, points: np.ndarray) -> np.ndarray:
        x, _ = normalize(points, self.reference)
        return ((x.reshape(len(x), -1) - self.mean) / self.std) @ self.weights + self.psi_mean


def choose_alpha(points: np.ndarray, psi: np.ndarray, clip: np.ndarray, folds: int = 4) -> float:
    """The ridge weight with the best identity-grouped cross-validated clip psi_corr."""
    ids = np.unique(clip)
    folds = min(folds, len(ids))
    scores = {}
    for alpha in ALPHAS:
        s = []
        for k in range(folds):
            held = np.isin(clip, ids[k::folds])
            s.append(clip_psi_corr(Readout(points[~held], psi[~held], alpha)(points[held]), psi[held], clip[held]))
        scores[alpha] = float(np.mean(s))
    return max(scores, key=scores.get)


def fit_readout(points: np.ndarray, psi: np.ndarray, clip: np.ndarray) -> Readout:
    """The read-out at the cross-validated ridge weight (``Readout.alpha``)."""
    return Readout(points, psi, choose_alpha(points, psi, clip))


def gather(work: Path, identities: int, frames: int, size: int, seed: int) -> dict[str, np.ndarray]:
    """Render, encode, decode and track a synthetic corpus (the job's path, through the landmark
    calibration's ``collect``); every frame with a detection: the 478 points, the true 68, ψ[:COEFFS]
    and its clip's index."""
    from models.head.resolve import synthetic_model_file
    from preprocessing.landmark_calibration import DENSE_CONVENTION, collect
    from preprocessing.synthetic.world import load_clip

    obs = collect(synthetic_model_file(0), work, identities=identities, frames=frames, size=size, seed=seed,
                  progress=False, convention=DENSE_CONVENTION)
    out = {"mp478": [], "true68": [], "psi": [], "clip": []}
    for i, o in enumerate(obs):
        found = np.isfinite(o.detected.numpy()).all((1, 2))
        out["mp478"].append(o.detected.numpy()[found].astype(np.float64))
        out["true68"].append(o.model_points.numpy()[found].astype(np.float64))
        out["psi"].append(load_clip(work, o.clip_id)["expression"][found, :COEFFS].astype(np.float64))
        out["clip"].append(np.full(found.sum(), i))
    return {k: np.concatenate(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--identities", type=int, default=40, help="calibration identities (one clip each)")
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1002, help="calibration corpus seed (not an evaluated one)")
    ap.add_argument("--eval-clips", type=int, default=3, help="the fitting benchmark's clips")
    ap.add_argument("--eval-seed", type=int, default=3, help="the fitting benchmark's seed")
    args = ap.parse_args()
    for name, least in (("identities", 4), ("frames", 1), ("size", 1), ("eval_clips", 1)):
        if getattr(args, name) < least:
            print(json.dumps({"error": "BadArgument", "argument": f"--{name.replace('_', '-')}",
                              "value": getattr(args, name)}))
            sys.exit(2)
    if args.seed == args.eval_seed:
        print(json.dumps({"error": "BadArgument", "argument": "--seed", "value": args.seed,
                          "reason": "the calibration seed must differ from the evaluated one"}))
        sys.exit(2)

    from preprocessing.tracking import MEDIAPIPE_TO_IBUG68
    with tempfile.TemporaryDirectory() as tmp:
        train = gather(Path(tmp) / "calibration", args.identities, args.frames, args.size, args.seed)
        test = gather(Path(tmp) / "evaluation", args.eval_clips, args.frames, args.size, args.eval_seed)
    if len(np.unique(train["clip"])) < 4 or not len(test["clip"]):
        print(json.dumps({"error": "TooFewDetections", "calibration_clips": int(len(np.unique(train["clip"]))),
                          "evaluation_frames": int(len(test["clip"]))}))
        sys.exit(2)
    inputs = {"mediapipe478": lambda d: d["mp478"], "mediapipe68": lambda d: d["mp478"][:, MEDIAPIPE_TO_IBUG68],
              "true68": lambda d: d["true68"]}
    results: dict = {}
    per_coeff = {}
    for name, pick in inputs.items():
        readout = fit_readout(pick(train), train["psi"], train["clip"])
        pred = readout(pick(test))
        results[f"psi_corr_{name}"] = clip_psi_corr(pred, test["psi"], test["clip"])
        results[f"alpha_{name}"] = readout.alpha
        per_coeff[name] = [round(float(np.corrcoef(pred[:, j], test["psi"][:, j])[0, 1]), 2)
                           if test["psi"][:, j].std() > 0 else None for j in range(COEFFS)]
    curve = {}
    ids = np.unique(train["clip"])
    for n in sorted({n for n in (len(ids) // 4, len(ids) // 2, len(ids)) if n >= 2}):
        keep = np.isin(train["clip"], ids[:n])
        pred = fit_readout(train["mp478"][keep], train["psi"][keep], train["clip"][keep])(test["mp478"])
        curve[str(n)] = round(clip_psi_corr(pred, test["psi"], test["clip"]), 3)
    results["psi_corr_mediapipe478_by_identities"] = curve
    results["per_coefficient_corr"] = per_coeff
    results.update(calibration_identities=int(len(ids)), calibration_frames=int(len(train["psi"])),
                   evaluation_clips=int(len(np.unique(test["clip"]))), evaluation_frames=int(len(test["psi"])))
    report(results, {"psi_corr (benchmarks/fitting.py)": 0.6})


if __name__ == "__main__":
    main()
