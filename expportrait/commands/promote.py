"""`expportrait promote --name expportrait --version N --alias champion [--gate FILE]`: move the
alias to version N only when its evaluation (``expportrait evaluate`` on that version) passes
the gate's thresholds (``configs/registry/gate.yaml``). A refusal exits 2 and names each
failing metric: ``{"error": "GateRefused", "message": "... psnr = 9.1 < min 20 ..."}``."""
from __future__ import annotations

import argparse
from pathlib import Path

from preprocessing.errors import positive_int

from .register import add_store_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("promote", help="move an alias to a model version if its evaluation passes the gate")
    p.add_argument("--name", default="expportrait")
    p.add_argument("--version", required=True, type=positive_int)
    p.add_argument("--alias", default="champion")
    p.add_argument("--gate", type=Path, default=None, help="gate config (default configs/registry/gate.yaml)")
    add_store_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict:
    from expportrait.registry import promote, tracking_from
    tracking_from(args.tracking_uri, args.store, must_exist=True)     # reads the registry: no new empty store
    return promote(args.name, args.version, args.alias, args.gate)
