"""The `expportrait` command line. Each subcommand prints one JSON object as its last line."""
from __future__ import annotations

import argparse
import json
import sys
import warnings

from .commands import demo, fit, head, synth, transfer, video
from .commands import evaluate, promote, reenact, register
from .commands import generate, preflight
from .commands import report_shot


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expportrait", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    head.add_parser(sub)
    synth.add_parser(sub)
    video.add_parser(sub)
    fit.add_parser(sub)
    transfer.add_parser(sub)
    demo.add_parser(sub)
    for command in (register, promote, evaluate, reenact):   # registry handoff, evaluation, inference
        command.add_parser(sub)
    generate.add_parser(sub)                                  # the generator alone: reference + normals -> mp4
    report_shot.add_parser(sub)                               # a report in headless Chromium: videos play + PNG
    preflight.add_parser(sub)                                 # shards against a recipe, before a launch
    return parser


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")   # torch's beta-state notices
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except Exception as exc:  # a clear one-line error, not a traceback, for expected failures
        from models.head.smplx_file import HeadModelFileError
        if isinstance(exc, (HeadModelFileError, FileNotFoundError, ValueError)):
            # exit 2: bad input or config; ``details`` (e.g. fit's status and source) joins the line
            print(json.dumps({"error": type(exc).__name__, "message": str(exc),
                              **getattr(exc, "details", {})}))
            return 2
        import traceback

        from preprocessing.clip_records import is_environment_fault
        traceback.print_exc(file=sys.stderr)
        if is_environment_fault(exc):
            print(json.dumps({"error": "EnvironmentFault", "message": f"{exc.strerror}: {exc.filename}"}))
            return 3          # the machine, not the input: disk full, permission denied
        print(json.dumps({"error": "InternalError", "message": f"{type(exc).__name__}: {exc}"}))
        return 4              # a bug: the traceback is on stderr
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
