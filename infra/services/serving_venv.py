"""A clean virtualenv that serves a registered model: made only from the model's own requirements.

    python infra/services/serving_venv.py MODEL_DIR [--cache DIR]

``MODEL_DIR`` is a downloaded model version (``mlflow artifacts download -u
models:/expportrait@champion``): ``python -m venv``, then ``pip install -r requirements.txt``
from that folder (its wheel paths are relative to it; its ``constraints.txt`` pins the whole
closure to the versions the model was tested with). The development environment is not used
and the repository is not installed: what serves is what the package names. Cached under
``DIR/serving-venv/<sha256 of requirements.txt and constraints.txt>`` (default ``$EXPPORTRAIT_CACHE``, else
``~/.cache/expportrait``); a build that did not finish is redone. Prints one JSON line: ``venv``,
``seconds``, ``megabytes``, ``cached``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def default_cache() -> Path:
    return Path(os.environ.get("EXPPORTRAIT_CACHE") or Path.home() / ".cache" / "expportrait")


def build(model_dir: Path, cache: Path | None = None) -> tuple[Path, dict]:
    """The venv for ``model_dir``'s requirements (built, or found in the cache) and its record."""
    model_dir = Path(model_dir)
    key = hashlib.sha256()                                   # requirements and their pinned closure
    for name in ("requirements.txt", "constraints.txt"):
        if (model_dir / name).is_file():
            key.update((model_dir / name).read_bytes())
    key = key.hexdigest()[:16]
    venv = (cache or default_cache()) / "serving-venv" / key
    record = venv / "built.json"
    if record.is_file():
        return venv, {**json.loads(record.read_text()), "cached": True}
    shutil.rmtree(venv, ignore_errors=True)                  # a build that did not finish
    t0 = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    base = getattr(sys, "_base_executable", sys.executable)  # not the development venv's python
    subprocess.run([base, "-m", "venv", str(venv)], check=True, env=env, timeout=300)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                          "-r", "requirements.txt"], cwd=model_dir, env=env, capture_output=True, text=True,
                         timeout=3000)
    if pip.returncode != 0:
        raise RuntimeError(f"pip install -r {model_dir / 'requirements.txt'} failed:\n{pip.stderr[-4000:]}")
    size = subprocess.run(["du", "-sm", str(venv)], capture_output=True, text=True).stdout.split()[0]
    built = {"seconds": round(time.perf_counter() - t0, 1), "megabytes": int(size), "requirements_sha256": key}
    record.write_text(json.dumps(built))                     # written last: the venv is complete
    return venv, {**built, "cached": False}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", type=Path, help="a downloaded model version (holds requirements.txt)")
    p.add_argument("--cache", type=Path, default=None, help="cache folder (default $EXPPORTRAIT_CACHE or "
                                                            "~/.cache/expportrait)")
    args = p.parse_args(argv)
    if not (args.model_dir / "requirements.txt").is_file():
        print(json.dumps({"error": "bad_model_dir", "model_dir": str(args.model_dir),
                          "message": "no requirements.txt there (download the model version first)"}))
        return 2
    try:
        venv, built = build(args.model_dir, args.cache)
    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
        print(json.dumps({"error": "venv_build_failed", "message": str(exc)[-2000:]}))
        return 1
    print(json.dumps({"venv": str(venv), **built}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
