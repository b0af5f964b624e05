"""`expportrait synth corpus`: the synthetic talking-head world with exact ground truth."""
from __future__ import annotations

import argparse
from pathlib import Path

from preprocessing.errors import nonnegative_int, positive_float, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    synth = sub.add_parser("synth", help="synthetic data").add_subparsers(dest="synth_cmd", required=True)
    p = synth.add_parser("corpus", help="render a synthetic talking-head corpus with ground truth")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--identities", type=positive_int, default=8)
    p.add_argument("--clips-per-identity", type=positive_int, default=2)
    p.add_argument("--frames", type=positive_int, default=48)
    p.add_argument("--size", type=positive_int, default=128)
    p.add_argument("--fps", type=positive_float, default=25.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", type=Path, default=None,
                   help="synthetic SMPL-X-format model (default: the cached seed-0 model)")
    p.add_argument("--subdivision", type=nonnegative_int, default=1)
    p.set_defaults(func=corpus)


def corpus(args: argparse.Namespace) -> dict:
    from models.head.resolve import synthetic_model_file
    from preprocessing.synthetic.world import WorldConfig, generate_corpus

    model = args.model or synthetic_model_file(0)
    config = WorldConfig(identities=args.identities, clips_per_identity=args.clips_per_identity,
                         frames=args.frames, size=args.size, fps=args.fps, seed=args.seed,
                         subdivision=args.subdivision)
    result = generate_corpus(args.out, config, model)
    return {"corpus": str(result.out), "clips": result.clips, "frames": result.frames,
            "seconds": round(result.seconds, 2), "frames_per_second": round(result.frames_per_second, 2),
            "manifest": str(result.out / "manifest.parquet"), "pairs": str(result.out / "pairs.parquet")}
