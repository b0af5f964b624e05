"""`expportrait register --run RUN_ID --name expportrait --alias candidate`: package a training
run's exports (transfer module, generator, codec) with the head model's hash and the
preprocessing/inference settings as one MLflow pyfunc, register a version, set the alias.

    expportrait register --store outputs/train/dit_tiny_cpu --run RUN_ID [--transfer-run ID]
        [--generator DIR --codec DIR --transfer DIR] [--head-model SMPLX.npz]
        [--size 64 --window 9 --overlap 4 --frame-stride 1 --steps 8]   (default: the run's params)
        [--dtype bf16]                                                  (the generator's stored weights)
"""
from __future__ import annotations

import argparse
from pathlib import Path

from preprocessing.errors import (
    finite_float,
    nonnegative_int,
    positive_float,
    positive_int,
)


def add_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking/registry URI (default $MLFLOW_TRACKING_URI)")
    p.add_argument("--store", type=Path, default=None,
                   help="a run folder whose embedded store (sqlite:///STORE/mlflow.db) to use")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("register", help="register a training run's models as one MLflow pyfunc version")
    p.add_argument("--run", required=True, help="MLflow run id holding export/ (the generator's run)")
    p.add_argument("--name", default="expportrait")
    p.add_argument("--alias", default="candidate", help="alias set on the new version ('' for none)")
    p.add_argument("--transfer-run", default=None, help="run id exporting the transfer module, if another run")
    p.add_argument("--generator", default=None, help="local generator folder instead of the run's export")
    p.add_argument("--codec", default=None, help="local codec (AutoencoderKLWan) folder")
    p.add_argument("--transfer", default=None, help="local transfer-module folder")
    p.add_argument("--head-model", default=None,
                   help="the SMPL-X-format .npz the models were trained with (default: the run's "
                        "head_model param, else the synthetic model); only its hash is packed")
    p.add_argument("--data", default=None, help="data tag (default: the run's data root param)")
    for name, typ in (("size", positive_int), ("window", positive_int), ("overlap", nonnegative_int),
                      ("frame_stride", positive_int), ("steps", positive_int), ("guidance", finite_float),
                      ("shift", positive_float), ("fps", positive_float)):
        p.add_argument(f"--{name.replace('_', '-')}", type=typ, default=None,
                       help=f"inference {name} packed with the model (default: the run's, else the package default)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="stored dtype of the generator weights (bf16: half the size; codec and transfer stay fp32)")
    add_store_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict:
    from expportrait.registry import register, tracking_from
    tracking_from(args.tracking_uri, args.store, must_exist=True)     # reads the run: no new empty store
    overrides = {k: getattr(args, k) for k in ("size", "window", "overlap", "frame_stride", "steps", "guidance",
                                               "shift", "fps")}
    return register(args.run, args.name, args.alias or None, transfer_run=args.transfer_run,
                    generator=args.generator, codec=args.codec, transfer=args.transfer,
                    head_model=args.head_model, inference_overrides=overrides, data=args.data,
                    dtype=args.dtype)
