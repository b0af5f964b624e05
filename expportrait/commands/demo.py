"""`expportrait demo`: the main loop end to end on embedded defaults (grows with the project).

Now: write the synthetic SMPL-X-format model, then render the head-representation sweep
(mp4 + normal / depth / mask maps + the personalized mesh).
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo on embedded defaults")
    p.add_argument("--out", type=Path, default=Path("outputs/demo"))
    p.add_argument("--size", type=int, default=256)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict:
    from expportrait.assets import synthetic_model_file
    from . import head

    print(f"[demo] synthetic SMPL-X-format model -> {args.out / 'models'}", flush=True)
    model = synthetic_model_file(seed=0, directory=args.out / "models")
    print(f"[demo] rendering the head sweep -> {args.out / 'head'}", flush=True)
    render_args = argparse.Namespace(model=model, out=args.out / "head", size=args.size,
                                     frames_per_segment=16, fps=24.0, subdivision=1,
                                     backend="auto", seed=0)
    rendered = head.render(render_args)
    print(f"[demo] sweep video: {rendered['video']}")
    print(f"[demo] maps: {args.out / 'head'}/<segment>_{{normal,depth_mm,mask}}.png")
    print(f"[demo] personalized mesh: {rendered['mesh']}")
    return {"model": str(model), "head": rendered}
