"""The preprocessing job's configuration: one strict, typed model (pydantic), loaded from YAML.

Unknown keys, wrong types, out-of-range values and unknown enum values (codecs) are errors
that name the key and what is allowed; YAML syntax errors give the line and column. The
stage options live in :class:`preprocessing.clip_records.StageConfig` (they travel to the
workers); the fitting options under ``stages.fit`` are checked against ``FitConfig``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from preprocessing.clip_records import StageConfig

_STRICT = ConfigDict(extra="forbid", strict=True, validate_default=True, validate_assignment=True)


class ConfigError(ValueError):
    """A configuration the job cannot run with; the message names the key and the problem."""


class RayConfig(BaseModel):
    model_config = _STRICT

    address: str | None = None            # None: $RAY_ADDRESS, else an embedded local Ray
    num_cpus: Annotated[int, Field(ge=1)] | None = None      # embedded Ray only (None: all cores)
    num_gpus: Annotated[int, Field(ge=0)] | None = None
    object_store_mb: Annotated[int, Field(ge=80)] | None = 512   # embedded Ray only (Ray's floor: 75 MiB)
    include_dashboard: bool | None = False
    dashboard_host: str = "127.0.0.1"
    dashboard_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    log_to_driver: bool = False           # workers' stdout (MediaPipe, TF Lite) is noisy


class WorkerConfig(BaseModel):
    model_config = _STRICT

    num_cpus: Annotated[float, Field(gt=0)] = 1.0   # per worker actor (one clip at a time)
    num_gpus: Annotated[float, Field(ge=0)] = 0.0   # GPUs reserved per worker actor
    torch_threads: Annotated[int, Field(ge=1)] | None = None   # None: num_cpus rounded (at least 1)
    max_retries: Annotated[int, Field(ge=0)] = 3    # a call whose worker process died is re-run
    #                                                 (on the restarted actor) this often
    clip_retries: Annotated[int, Field(ge=0)] = 1   # a transient stage error is retried in place
    max_pending_shards: Annotated[int, Field(ge=1)] | None = None   # open shards (None: 2 + slots/clips per shard)
    autoscale_extra_workers: Annotated[int, Field(ge=0)] = 0   # on a cluster: ask Ray's autoscaler
    #   (request_resources) for this many worker slots beyond the cluster's size now, up to what the
    #   remaining clips can use; 0: use the cluster as it is. Ignored by an embedded Ray.


class PreprocessConfig(BaseModel):
    model_config = _STRICT

    input: str | None = None
    output: str = "outputs/preprocess"
    limit: Annotated[int, Field(ge=1)] | None = None
    head_model: str | None = None          # SMPL-X-format .npz; None: $EXPPORTRAIT_SMPLX_PATH, else the synthetic model
    subdivision: Annotated[int, Field(ge=0, le=3)] = 1
    clips_per_shard: Annotated[int, Field(ge=1)] = 8
    max_failure_ratio: Annotated[float, Field(ge=0, le=1)] = 0.5
    stages: StageConfig = Field(default_factory=StageConfig)
    workers: WorkerConfig = Field(default_factory=WorkerConfig)
    ray: RayConfig = Field(default_factory=RayConfig)


def _describe(err: dict, model: type[BaseModel]) -> str:
    """One pydantic error as ``key: problem`` (unknown keys list the known ones)."""
    loc = ".".join(str(p) for p in err["loc"]) or "config"
    if err["type"] == "extra_forbidden":
        known = _known_keys(model, err["loc"][:-1])
        return f"{loc}: unknown key" + (f" (known: {', '.join(known)})" if known else "")
    value = err.get("input")
    shown = f" (got {value!r})" if not isinstance(value, dict) and len(repr(value)) < 80 else ""
    return f"{loc}: {err['msg']}{shown}"


def _known_keys(model: type[BaseModel], path: tuple) -> list[str]:
    for part in path:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        if part == "fit" and model is StageConfig:
            from preprocessing.clip_records import fit_options_model
            model = fit_options_model()
        elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            model = field.annotation
        else:
            return []
    return sorted(model.model_fields)


def validate_config(data: Any, source: str = "config") -> PreprocessConfig:
    """Build the config from plain data; :class:`ConfigError` listing every problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}")
    try:
        return PreprocessConfig.model_validate(data)
    except ValidationError as exc:
        problems = [_describe(e, PreprocessConfig) for e in exc.errors()]
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None


def read_yaml(path: str | os.PathLike) -> Any:
    """The YAML file's data; :class:`ConfigError` with the line and column of a syntax error."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config {path} cannot be read: {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context = getattr(exc, "context", None)
        raise ConfigError(f"config {path}: YAML error{where}: {problem}"
                          + (f" ({context})" if context else "")) from None


def load_config(path: str | os.PathLike | None, overrides: dict | None = None) -> PreprocessConfig:
    """The validated config: the YAML file (optional), then command-line ``overrides`` (their
    ``None`` values are ignored). An input is required."""
    data = read_yaml(path) if path is not None else {}
    if data is None:
        data = {}
    if isinstance(data, dict):
        data = {**data, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    cfg = validate_config(data, f"config {path}" if path else "config")
    if cfg.input is None:
        raise ConfigError("no input: set `input:` in the config or pass --input")
    return cfg
