"""User mistakes, exit codes and the one command wrapper every entry point runs its work in
(``expportrait``, ``python -m pipelines.preprocess``, ``python -m training.train``).

Exit codes (every exit ends with one JSON line on stdout):

  0  done: the command's result (a command may set ``exit_code`` 1 in it, e.g. the
     preprocessing job when too many clips failed)
  2  a user's mistake: ``{"error": ..., "message": ...}`` naming the value; no traceback
  3  an environment fault: disk full, permission denied, read-only output, a store or
     cluster that does not answer
  4  a bug: the traceback on stderr, then ``{"error": "InternalError", ...}``

This module sits in the lowest layer the three entry points share (``preprocessing``), so
``pipelines`` and ``training`` use it without importing ``expportrait``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILURES, EXIT_USER, EXIT_ENVIRONMENT, EXIT_BUG = 0, 1, 2, 3, 4
#: the exit codes as a command's --help lists them
EXIT_CODES_HELP = """\
exit codes (every exit ends with a one-line JSON object on stdout):
  0  done: the command's result
  2  a mistake in the input: {"error": ..., "message": ...} names the value (no traceback)
  3  environment fault: disk full, permission denied, a store that does not answer
  4  internal error (a bug; the traceback is on stderr): please report it
"""


class UserError(ValueError):
    """A user's mistake (exit 2); the message names the value. ``details`` join the JSON line."""

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.details = details


class UsageError(UserError):
    """A command-line argument argparse refused (unknown flag, a value of the wrong type)."""


class EnvironmentFault(RuntimeError):
    """The machine, not the input (exit 3): a full disk, no permission, a store that does not answer."""


#: exceptions of the project's own input checks that are a user's mistake; ValueError covers
#: the domain errors that subclass it (HeadModelFileError, SubjectError, ConfigError, ...)
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, FileNotFoundError, NotADirectoryError,
                                                IsADirectoryError)


def is_environment_fault(exc: BaseException) -> bool:
    """A disk, filesystem or permission fault (the errno says so), or an :class:`EnvironmentFault`."""
    from preprocessing.clip_records import is_environment_fault as os_fault
    return isinstance(exc, EnvironmentFault) or os_fault(exc)


def strict_json(value: Any) -> Any:
    """``value`` with NaN and ±inf floats as None, so strict JSON parsers accept the line."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def print_line(payload: dict) -> None:
    """One strict-JSON line on stdout (``default=str`` for paths and the like)."""
    print(json.dumps(strict_json(payload), default=str, allow_nan=False), flush=True)


def error_line(error: str, message: str, code: int, **details: Any) -> dict:
    return {"error": error, "message": message, **details, "exit_code": code}


def classify(exc: BaseException, user_errors: tuple = (), environment_errors: tuple = ()) -> int:
    """The exit code of an exception that ended a command's work."""
    if isinstance(exc, environment_errors) or is_environment_fault(exc):
        return EXIT_ENVIRONMENT
    if isinstance(exc, USER_ERRORS + tuple(user_errors)):
        return EXIT_USER
    return EXIT_BUG


def run_command(work: Callable[[], dict], user_errors: tuple = (), environment_errors: tuple = ()) -> int:
    """Run ``work`` and end with its JSON line; the exit code as the module docstring says.
    ``work`` returns its result dict; an ``exit_code`` key in it (e.g. 1) is the exit code."""
    try:
        result = work()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 (every ending gets its code and JSON line)
        code = classify(exc, user_errors, environment_errors)
        if code == EXIT_USER:
            print_line(error_line(type(exc).__name__, str(exc), code, **getattr(exc, "details", {})))
        elif code == EXIT_ENVIRONMENT:
            where = getattr(exc, "filename", None)
            text = f"{exc.strerror}: {where}" if isinstance(exc, OSError) and exc.strerror else str(exc)
            print_line(error_line("EnvironmentFault", text, code))
        else:
            traceback.print_exc(file=sys.stderr)
            print_line(error_line("InternalError", f"{type(exc).__name__}: {exc}", code))
        return code
    result = result if isinstance(result, dict) else {"result": result}
    print_line(result)
    return int(result.get("exit_code", EXIT_OK))


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors end like every other mistake: argparse's usage on stderr,
    the JSON line on stdout, exit 2 (subcommand parsers inherit it)."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        print_line(error_line("UsageError", f"{self.prog}: {message}", EXIT_USER))
        sys.exit(EXIT_USER)


# -- argument types: one definition of each range check ------------------------------------------
def _number(text: str, cast: Callable[[str], float | int], what: str) -> float | int:
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what} (finite)")
    return value


def finite_float(text: str) -> float:
    """A finite float (not nan, not inf)."""
    return float(_number(text, float, "a finite number"))


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def nonnegative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def positive_int(text: str) -> int:
    value = int(_number(text, int, "an integer"))
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def nonnegative_int(text: str) -> int:
    value = int(_number(text, int, "an integer"))
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be an integer >= 0")
    return value


# -- paths -------------------------------------------------------------------------------------
def writable_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``path`` (a folder) if needed and check that a file can be written in it, before
    any work; an unwritable place is the user's mistake naming the path (exit 2)."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise UserError(f"{what} {path}: {existing} is a file, not a folder", path=str(path))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path} is not writable (no write permission on {existing})", path=str(path))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{what} {path} cannot be created: {exc.strerror}", path=str(path)) from exc
    return path


def writable_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """An output file's folder is writable (created if needed) and the path is not a folder."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, not a file", path=str(path))
    try:
        writable_dir(path.parent, "its folder")
    except UserError as exc:
        raise UserError(f"{what} {path}: {exc}", path=str(path)) from None
    return path
