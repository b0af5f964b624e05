"""Synthetic corpus generation speed.

    python benchmarks/synth_corpus.py [--identities 8 --clips 2 --frames 48 --size 128]

Generates the corpus (identities, clip motion, renders, H.264 encode, ground truth, manifests)
into a temporary folder and reports the wall time, frames/s and where the time went.
Target on 2 CPU cores: 8 identities x 2 clips x 48 frames at 128^2 in <= 120 s.
Last line: one JSON object with seconds, frames_per_second and clips.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings

warnings.filterwarnings("ignore", message=".*[Ss]parse.*")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--identities", type=int, default=8)
    ap.add_argument("--clips", type=int, default=2)
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--size", type=int, default=128)
    args = ap.parse_args()

    from models.head.resolve import synthetic_model_file
    from preprocessing.synthetic.world import WorldConfig, generate_corpus

    model = synthetic_model_file(0)           # cached; building it is not part of the corpus
    config = WorldConfig(identities=args.identities, clips_per_identity=args.clips,
                         frames=args.frames, size=args.size)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = generate_corpus(tmp, config, model, progress=False)
        seconds = time.perf_counter() - t0
    headline = {"identities": args.identities, "clips": result.clips, "frames": result.frames,
                "size": args.size, "seconds": round(seconds, 2),
                "frames_per_second": round(result.frames / seconds, 2),
                "target_seconds": (120 if (args.identities, args.clips, args.frames, args.size) == (8, 2, 48, 128)
                                   else None)}
    print(f"{result.clips} clips, {result.frames} frames at {args.size}^2 in {seconds:.1f} s "
          f"({headline['frames_per_second']} frames/s)")
    print(json.dumps(headline))
    from _report import write_result           # benchmarks/results/synth_corpus.json
    write_result(headline)


if __name__ == "__main__":
    main()
