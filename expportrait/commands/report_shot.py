"""`expportrait report-shot REPORT.html --out PNG`: open an evaluation report in headless Chromium,
check that every ``<video>`` decodes a frame, and save a screenshot of the page.

Exit 0 with a JSON line (videos loaded, failures with the browser's error, the PNG); a video that
does not play makes it a ``ValueError`` (exit 2) naming the videos; no Chromium: exit 2 saying how
to get one (``$CHROMIUM`` points at any Chrome/Chromium binary).
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report-shot", help="open a report in headless Chromium: videos play? + a PNG screenshot")
    p.add_argument("report", type=Path, help="report.html written by `expportrait evaluate`")
    p.add_argument("--out", type=Path, default=None, help="PNG to write (default: REPORT folder/report.png)")
    p.add_argument("--chromium", default=None, help="Chromium/Chrome executable (default: $CHROMIUM, PATH)")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=900, help="viewport height")
    p.add_argument("--max-height", type=int, default=None, help="cut the full-page picture at this many pixels")
    p.add_argument("--viewport-only", action="store_true", help="only the first screen, not the whole page")
    p.add_argument("--video-timeout", type=float, default=30.0, help="seconds to wait for the videos")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict:
    from expportrait.evaluation.browser import check_report
    out = args.out or Path(args.report).with_name("report.png")
    check = check_report(args.report, out, chromium=args.chromium, width=args.width, height=args.height,
                         full_page=not args.viewport_only, max_height=args.max_height,
                         video_timeout=args.video_timeout)
    result = check.as_dict()
    if check.failed:
        exc = ValueError(f"{len(check.failed)} of {len(check.videos)} videos did not play in Chromium: "
                         + "; ".join(f"{f['src']}: {f['error']}" for f in result["failed"]))
        exc.details = {k: v for k, v in result.items() if k != "failed"}   # the CLI adds them to its line
        raise exc
    return result
