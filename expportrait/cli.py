"""The `expportrait` command line. Each subcommand prints one JSON object as its last line."""
from __future__ import annotations

import argparse
import sys
import warnings

from .commands import demo, fit, head, synth, transfer, video
from .commands import evaluate, promote, reenact, register
from .commands import generate, preflight, preprocess
from .commands import plan, recipe
from .commands import report_shot


def build_parser() -> argparse.ArgumentParser:
    from preprocessing.errors import EXIT_CODES_HELP, CommandParser
    parser = CommandParser(prog="expportrait", description=__doc__, epilog=EXIT_CODES_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
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
    preprocess.add_parser(sub)                                # the preprocessing job with a recipe's config
    plan.add_parser(sub)                                      # capacity plan: hours, bytes, cluster shape
    recipe.add_parser(sub)                                    # a recipe's resolved configs, for launchers
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse, run the subcommand in the shared wrapper (preprocessing/errors.py): exit 0 with its
    JSON line, 2 a user's mistake, 3 an environment fault, 4 a bug (traceback on stderr)."""
    from preprocessing.errors import run_command
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")   # torch's beta-state notices
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
