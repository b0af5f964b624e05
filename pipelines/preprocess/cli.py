"""Command line of the preprocessing job (``python -m pipelines.preprocess``)."""
from __future__ import annotations

import argparse

from preprocessing.errors import (
    EXIT_BUG,
    EXIT_ENVIRONMENT,
    EXIT_FAILURES,
    EXIT_OK,
    EXIT_USER,
    CommandParser,
    run_command,
)

from ..job_io import JobInputError
from .config import ConfigError, load_config
from .job import EnvironmentFault, run

EXIT_BAD_INPUT, EXIT_INTERNAL = EXIT_USER, EXIT_BUG          # the names the job's docs and tests use

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


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m pipelines.preprocess", description=USAGE, epilog=EPILOG,
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _run(args), user_errors=(ConfigError, JobInputError),
                       environment_errors=(EnvironmentFault,))


def _run(args: argparse.Namespace) -> dict:
    """The job; its result line (with ``exit_code``: 0, 1 too many clips failed, or the code of a
    fault the job recorded)."""
    cfg = load_config(args.config, {"input": args.input, "output": args.output, "limit": args.limit})
    return run_config(cfg, args)


def run_config(cfg, args: argparse.Namespace) -> dict:
    """The job on a validated config (``--address``, ``--dry-run``, ``--no-progress``,
    ``--retry-failed`` from ``args``); its result line, as :func:`_run` (``expportrait
    preprocess --recipe`` runs a recipe's config through here)."""
    if getattr(args, "address", None):
        cfg.ray.address = args.address
    summary = run(cfg, dry_run=args.dry_run, progress=not args.no_progress, retry_failed=args.retry_failed)
    if args.dry_run:
        return summary
    brief = {k: summary[k] for k in ("inputs", "finished", "ok", "failed", "failure_ratio", "samples",
                                      "statuses", "complete", "output")}
    brief["shards"] = len([s for s in summary["shards"] if s["tar"]])
    brief["last_run"] = {k: summary["last_run"].get(k) for k in
                         ("mode", "nodes", "clips_processed", "shards_written", "seconds", "manifest_written")}
    fault = summary.get("fault")
    if fault:
        code = {"EnvironmentFault": EXIT_ENVIRONMENT, "ConfigError": EXIT_BAD_INPUT}.get(fault["error"], EXIT_INTERNAL)
        return {**fault, "exit_code": code, **brief}
    if summary["failure_ratio"] > cfg.max_failure_ratio:
        brief["error"] = (f"failure ratio {summary['failure_ratio']:.2f} is above max_failure_ratio "
                          f"{cfg.max_failure_ratio:.2f}; see {summary['output']}/errors.parquet")
        return {**brief, "exit_code": EXIT_FAILURES}
    return {**brief, "exit_code": EXIT_OK}
