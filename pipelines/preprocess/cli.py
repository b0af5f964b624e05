"""Command line of the preprocessing job (``python -m pipelines.preprocess``)."""
from __future__ import annotations

import argparse
import json
import sys
import traceback

from ..job_io import JobInputError
from .config import ConfigError, load_config
from .job import EnvironmentFault, InternalError, run

EXIT_OK, EXIT_FAILURES, EXIT_BAD_INPUT, EXIT_ENVIRONMENT, EXIT_INTERNAL = 0, 1, 2, 3, 4

USAGE = """\
The preprocessing job: talking-head videos -> WebDataset shards + parquet manifests.

Without an address (--address, ray.address in the config or $RAY_ADDRESS) it starts an
embedded Ray bound to loopback; with one it joins that cluster. The same command runs under
`ray job submit --working-dir . -- python -m pipelines.preprocess ...`. Reruns skip the
shards whose done marker matches the plan.
"""
EPILOG = """\
exit codes (every exit ends with a one-line JSON summary on stdout):
  0  done: every planned shard written, failure ratio within max_failure_ratio
  1  done, but more clips failed than max_failure_ratio allows (see OUT/errors.parquet)
  2  bad configuration or input: unknown key, wrong type or value, YAML error, a head model
     that is not one, a missing input, duplicate clip ids, an output busy with another job
  3  environment fault: disk full, permission denied, read-only output, cluster unreachable
     (the manifest and summary of what finished are written when the disk allows)
  4  internal error (a bug; the traceback is on stderr): please report it
"""


class _Parser(argparse.ArgumentParser):
    """Argument errors end with the JSON line and exit 2 too (after argparse's usage text)."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        print(json.dumps({"error": "UsageError", "message": message, "exit_code": EXIT_BAD_INPUT}))
        sys.exit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m pipelines.preprocess", description=USAGE, epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (see configs/preprocess/local.yaml)")
    p.add_argument("--input", help="folder of videos or manifest (.parquet/.csv)")
    p.add_argument("--output", help="output folder")
    p.add_argument("--limit", type=int, help="only the first N clips (sorted by clip id)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else embedded)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config, head model and inputs; print the plan; write nothing")
    p.add_argument("--retry-failed", action="store_true",
                   help="also redo done shards with worker_lost / stage_error clips")
    p.add_argument("--no-progress", action="store_true")
    return p


def _error(exc: BaseException, code: int) -> int:
    print(json.dumps({"error": type(exc).__name__, "message": str(exc), "exit_code": code}))
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, {"input": args.input, "output": args.output, "limit": args.limit})
        if args.address:
            cfg.ray.address = args.address
        summary = run(cfg, dry_run=args.dry_run, progress=not args.no_progress,
                      retry_failed=args.retry_failed)
    except (ConfigError, JobInputError) as exc:
        return _error(exc, EXIT_BAD_INPUT)
    except EnvironmentFault as exc:
        return _error(exc, EXIT_ENVIRONMENT)
    except Exception as exc:  # noqa: BLE001 - a bug: traceback on stderr, the JSON line still
        traceback.print_exc(file=sys.stderr)
        return _error(InternalError(f"{type(exc).__name__}: {exc}"), EXIT_INTERNAL)
    if args.dry_run:
        print(json.dumps(summary))
        return EXIT_OK
    brief = {k: summary[k] for k in ("inputs", "finished", "ok", "failed", "failure_ratio", "samples",
                                      "statuses", "complete", "output")}
    brief["shards"] = len([s for s in summary["shards"] if s["tar"]])
    brief["last_run"] = {k: summary["last_run"].get(k) for k in
                         ("mode", "nodes", "clips_processed", "shards_written", "seconds", "manifest_written")}
    fault = summary.get("fault")
    if fault:
        code = {"EnvironmentFault": EXIT_ENVIRONMENT, "ConfigError": EXIT_BAD_INPUT}.get(fault["error"], EXIT_INTERNAL)
        print(json.dumps({**fault, "exit_code": code, **brief}))
        return code
    if summary["failure_ratio"] > cfg.max_failure_ratio:
        brief["error"] = (f"failure ratio {summary['failure_ratio']:.2f} is above max_failure_ratio "
                          f"{cfg.max_failure_ratio:.2f}; see {summary['output']}/errors.parquet")
        brief["exit_code"] = EXIT_FAILURES
        print(json.dumps(brief))
        return EXIT_FAILURES
    print(json.dumps({**brief, "exit_code": EXIT_OK}))
    return EXIT_OK
