"""`expportrait video probe FILE`: what a video is and whether it is usable."""
from __future__ import annotations

import argparse
from pathlib import Path

from preprocessing.errors import positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    video = sub.add_parser("video", help="video ingestion").add_subparsers(dest="video_cmd", required=True)
    p = video.add_parser("probe", help="probe a video; prints one JSON object with its status")
    p.add_argument("file", type=Path)
    p.add_argument("--min-frames", type=positive_int, default=2)
    p.set_defaults(func=probe)


def probe(args: argparse.Namespace) -> dict:
    from preprocessing.ingest import probe as probe_video
    return probe_video(args.file, min_frames=args.min_frames).to_dict()
