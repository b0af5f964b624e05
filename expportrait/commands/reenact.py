"""`expportrait reenact`: animate a portrait with a driving video (expportrait/reenactment.py).

    expportrait reenact --model models:/expportrait@champion --source IMAGE_OR_VIDEO
        --driving VIDEO --out OUT.mp4 [--side-by-side] [--paste-back] [--max-frames N]
    expportrait reenact --model MODEL --pairs PAIRS.csv --out-dir DIR [--workers 2]   # Ray batch

MODEL: a package folder, a folder of exports (with --codec/--transfer) or a ``models:/`` URI (with
--tracking-uri/--store or $MLFLOW_TRACKING_URI). Sources and drivers: images or videos (tracked and fitted here) or
synthetic corpus clips (``clips/<id>.npz``). ``--side-by-side`` also writes
``OUT_side_by_side.mp4`` (reference | driving | driving normals | generated); ``--paste-back``
puts the generated crop back into the source's full frame (raw image/video sources). A source
or driver that cannot be used exits 2 with ``status`` (e.g. ``no_face``, ``not_a_video``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from preprocessing.errors import nonnegative_int, positive_float, positive_int

from .register import add_store_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reenact", help="drive a source portrait with a driving video (or a table of pairs)")
    p.add_argument("--model", required=True, help="package folder or models:/NAME@ALIAS | models:/NAME/N")
    p.add_argument("--source", default=None,
                   help="image or video (or corpus clip .npz); its first frame is the reference")
    p.add_argument("--driving", default=None, help="driving video (or corpus clip .npz)")
    p.add_argument("--out", type=Path, default=None, help="output mp4")
    p.add_argument("--pairs", type=Path, default=None, help="batch: a csv/parquet table with source, driving [, out]")
    p.add_argument("--out-dir", type=Path, default=None, help="batch: videos and manifest")
    p.add_argument("--workers", type=positive_int, default=1, help="batch: Ray worker actors")
    p.add_argument("--cpus-per-worker", type=positive_float, default=1.0)
    p.add_argument("--address", default=None, help="batch: Ray cluster address (default: embedded)")
    p.add_argument("--side-by-side", action="store_true")
    p.add_argument("--paste-back", action="store_true")
    p.add_argument("--max-frames", type=nonnegative_int, default=0, help="driving frames to use (0: all)")
    p.add_argument("--steps", type=int, default=-1, help="sampler steps (-1: the model's)")
    p.add_argument("--seed", type=int, default=-1)
    p.add_argument("--head-model", default=None, help="local SMPL-X-format .npz (checked against the model's hash)")
    p.add_argument("--codec", default=None, help="codec folder, when --model is a folder of exports")
    p.add_argument("--transfer", default=None, help="transfer-module folder, when --model is a folder of exports")
    add_store_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict:
    params = {"steps": args.steps, "seed": args.seed, "max_frames": args.max_frames,
              "side_by_side": args.side_by_side, "paste_back": args.paste_back}
    uri = None
    if args.model.startswith(("models:/", "runs:/")):
        from expportrait.registry import tracking_from
        uri = tracking_from(args.tracking_uri, args.store, must_exist=True)   # reads the registry
    if args.pairs is not None:
        if args.out_dir is None:
            raise ValueError("--pairs needs --out-dir")
        from expportrait.batch_reenact import run_batch
        from preprocessing.errors import writable_dir
        writable_dir(args.out_dir, "--out-dir")
        return run_batch(args.model, args.pairs, args.out_dir, args.workers, params, args.address,
                         cpus_per_worker=args.cpus_per_worker, tracking_uri=uri, head_model=args.head_model)
    if not (args.source and args.driving and args.out):
        raise ValueError("give --source, --driving and --out (or --pairs and --out-dir)")
    import time

    from expportrait.registry import load_reenactor, reenact_to_file
    from preprocessing.errors import writable_file
    writable_file(args.out, "--out")                    # before the model loads and the work runs
    t0 = time.perf_counter()
    reenactor, desc = load_reenactor(args.model, args.head_model, {"codec": args.codec, "transfer": args.transfer})
    out = reenact_to_file(reenactor, args.source, args.driving, args.out, params)
    return {"source": args.source, "driving": args.driving, **out,
            **{k: v for k, v in desc.items() if k in ("model", "name", "version")},
            "inference": vars(reenactor.settings), "seconds": round(time.perf_counter() - t0, 2)}
