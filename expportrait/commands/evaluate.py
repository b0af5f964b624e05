"""`expportrait evaluate --model MODEL --protocol self|cross --data DIR --out DIR`.

MODEL: a package folder, a folder of exports (generator/codec/transfer found inside, or named
by --codec/--transfer) or a ``models:/name/N`` / ``models:/name@alias`` URI. Runs the model and
the copy-reference baseline on the data's pairs (expportrait/evaluation/harness.py), writes
``OUT/report.html`` (open it in a browser), ``OUT/metrics.json``, ``OUT/pairs.csv``, side-by-side
videos and plots; logs params, metrics (``model.*``, ``copy.*``) and the report folder to MLflow
(the given store, else an embedded one under OUT); for a registered version, stores the model's
metrics on it (tags ``eval.<protocol>.<metric>``) for ``expportrait promote``'s gate.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from preprocessing.errors import nonnegative_int, positive_int

from .register import add_store_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate a model (self / cross reenactment) with an HTML report")
    p.add_argument("--model", required=True, help="package folder or models:/NAME/N | models:/NAME@ALIAS")
    p.add_argument("--protocol", choices=("self", "cross"), default="self")
    p.add_argument("--data", required=True, type=Path, help="synthetic corpus or a folder of videos/images")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--max-pairs", type=positive_int, default=4)
    p.add_argument("--max-frames", type=nonnegative_int, default=None, help="driving frames per pair")
    p.add_argument("--lpips-backbone", default=None, help="local torchvision AlexNet weights (LPIPS); none: skipped")
    p.add_argument("--no-dlib", action="store_true", help="skip the dlib second opinion")
    p.add_argument("--no-motion", action="store_true", help="skip AED/APD (fits every generated video)")
    p.add_argument("--head-model", default=None, help="local SMPL-X-format .npz (checked against the model's hash)")
    p.add_argument("--experiment", default="evaluation")
    p.add_argument("--codec", default=None, help="codec folder, when --model is a folder of exports")
    p.add_argument("--transfer", default=None, help="transfer-module folder, when --model is a folder of exports")
    add_store_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict:
    return evaluate(args.model, args.protocol, args.data, args.out, max_pairs=args.max_pairs,
                    max_frames=args.max_frames, lpips_backbone=args.lpips_backbone, dlib=not args.no_dlib,
                    motion=not args.no_motion, head_model=args.head_model, experiment=args.experiment,
                    tracking_uri=args.tracking_uri, store=args.store,
                    parts={"codec": args.codec, "transfer": args.transfer})


def evaluate(model: str, protocol: str, data: str | Path, out: str | Path, max_pairs: int = 4,
             max_frames: int | None = None, lpips_backbone: str | None = None, dlib: bool = True,
             motion: bool = True, head_model: str | None = None, experiment: str = "evaluation",
             tracking_uri: str | None = None, store: str | Path | None = None,
             parts: dict[str, str | None] | None = None) -> dict:
    """Evaluate, report, log; returns the summary (model and copy means) and where things are."""
    import os

    import mlflow
    import torch

    from expportrait.evaluation.harness import EvalOptions, evaluate_pairs, make_pairs, summarize, write_results
    from expportrait.evaluation.report import write_report
    from expportrait.registry import experiment_in_store, load_reenactor, record_evaluation, tracking_from
    from preprocessing.errors import writable_dir

    if not Path(data).exists():
        raise FileNotFoundError(f"--data {data} does not exist")
    out = writable_dir(out, "--out")
    if tracking_uri is None and store is None and not os.environ.get("MLFLOW_TRACKING_URI"):
        if str(model).startswith("models:/"):
            raise ValueError("a models:/ URI needs the registry's store: --tracking-uri, --store or "
                             "MLFLOW_TRACKING_URI")
        store = out / "mlflow"                            # embedded store beside the report
    uri = tracking_from(tracking_uri, str(store) if store else None,
                        must_exist=str(model).startswith(("models:/", "runs:/")))
    t0 = time.perf_counter()
    reenactor, desc = load_reenactor(str(model), head_model, parts)
    pairs = make_pairs(data, protocol, max_pairs)
    opts = EvalOptions(max_pairs=max_pairs, max_frames=max_frames, lpips_backbone=lpips_backbone, dlib=dlib,
                       motion=motion)
    results = evaluate_pairs(reenactor, pairs, protocol, out, opts)
    summary = summarize(results)
    notes = ["Copy-reference baseline: the source reference frame repeated (perfect identity, no motion).",
             "CSIM uses SFace (OpenCV zoo) with a dlib second opinion; neither is ArcFace, so values are not "
             "comparable with papers' ArcFace CSIM.",
             "AED/APD are measured with this project's own fitter (MediaPipe landmarks + the head model); "
             "a generated video in which no face is tracked gives no value."]
    if protocol == "self":
        notes.append("Self-reenactment is scored from frame 1 on: frame 0 is the source reference itself.")
    if lpips_backbone is None:
        notes.append("LPIPS skipped: no local backbone given (--lpips-backbone); nothing is downloaded.")
    if summary.get("psnr_capped"):
        notes.append("Some PSNR values were infinite (identical frames) and are capped at 100 dB.")
    meta = {"protocol": protocol, "model": str(model), **{k: v for k, v in desc.items() if k != "model"},
            "data": str(data), "pairs": len(pairs), "inference": vars(reenactor.settings),
            "device": str(reenactor.device), "torch_threads": torch.get_num_threads(), "notes": notes}
    write_results(results, summary, out)
    report = write_report(results, summary, out, meta)
    experiment_in_store(experiment)                       # artifacts beside the store, not ./mlruns
    with mlflow.start_run(run_name=f"evaluate_{protocol}") as run:
        mlflow.log_params({"model": str(model)[:500], "protocol": protocol, "data": str(data)[:500],
                           "pairs": len(pairs), "max_frames": max_frames, "lpips_backbone": lpips_backbone,
                           **{f"inference.{k}": v for k, v in vars(reenactor.settings).items()}})
        for who in ("model", "copy"):
            mlflow.log_metrics({f"{who}.{k}": v for k, v in summary[who].items()
                                if isinstance(v, (int, float)) and math.isfinite(v)})
        mlflow.log_metrics({"pairs_failed": summary["pairs_failed"]})
        mlflow.set_tags({"protocol": protocol, **{f"model.{k}": str(v) for k, v in desc.items()}})
        for item in ("report.html", "metrics.json", "pairs.csv", "plots", "videos"):
            path = out / item
            if path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path=f"report/{item}")
            elif path.is_file():
                mlflow.log_artifact(str(path), artifact_path="report")
        run_id = run.info.run_id
    if "name" in desc and "version" in desc:
        record_evaluation(desc["name"], desc["version"], protocol,
                          {k: v for k, v in summary["model"].items() if isinstance(v, float)},
                          run_id)
    from expportrait.evaluation.harness import finite
    return {"protocol": protocol, "report": str(report), "metrics": str(out / "metrics.json"),
            "model": finite(summary["model"]), "copy": finite(summary["copy"]), "pairs": summary["pairs"],
            "pairs_failed": summary["pairs_failed"], "mlflow_run": run_id, "tracking_uri": uri,
            "seconds": round(time.perf_counter() - t0, 1)}
