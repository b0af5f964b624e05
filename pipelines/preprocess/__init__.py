"""The preprocessing job: talking-head videos -> WebDataset shards + parquet manifests.

    python -m pipelines.preprocess --config configs/preprocess/local.yaml [--input DIR|MANIFEST]
        [--output DIR] [--limit N] [--dry-run] [--retry-failed] [--address RAY_ADDRESS]

Modules: :mod:`.config` (the validated config), :mod:`.workers` (the worker actor and the
failure classes), :mod:`.scheduler` (actor pool and plan-order scheduling), :mod:`.job` (the
driver: plan, run, manifest, summary), :mod:`.cli` (arguments and exit codes). Per-clip logic
is in :mod:`preprocessing.clip_stages`; inputs and outputs in :mod:`pipelines.job_io`, the shard
format in :mod:`preprocessing.shard_format`.
"""
from .cli import (EXIT_BAD_INPUT, EXIT_ENVIRONMENT, EXIT_FAILURES, EXIT_INTERNAL, EXIT_OK, build_parser,
                  main)
from .config import ConfigError, PreprocessConfig, RayConfig, WorkerConfig, load_config, validate_config
from .job import EnvironmentFault, InternalError, check_head_model, run, stage_fingerprint

__all__ = ["EXIT_BAD_INPUT", "EXIT_ENVIRONMENT", "EXIT_FAILURES", "EXIT_INTERNAL", "EXIT_OK", "ConfigError",
           "EnvironmentFault", "InternalError", "PreprocessConfig", "RayConfig", "WorkerConfig", "build_parser",
           "check_head_model", "load_config", "main", "run", "stage_fingerprint", "validate_config"]
