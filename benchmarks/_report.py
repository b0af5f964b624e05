"""Shared benchmark output: a readable table, then one JSON line of headline figures, also kept
in ``benchmarks/results/<script name>.json`` with the date, the git commit and the command line
(``python benchmarks/render_results.py`` renders those files into ``docs/benchmarks.md``)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

from preprocessing.errors import strict_json

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def report(results: dict, targets: dict, digits: int = 3) -> None:
    """Print ``results`` as a table, then one JSON line (rounded, with ``targets``); save it."""
    width = max(len(k) for k in results)
    for k, v in results.items():
        print(f"{k:<{width}}  {v:10.2f}" if isinstance(v, float) else f"{k:<{width}}  {v!s:>10}")
    headline = {k: round(v, digits) if isinstance(v, float) else v for k, v in results.items()}
    headline["targets"] = targets
    print(json.dumps(headline))
    write_result(headline)


def calling_script() -> str:
    """The name of the benchmark that runs: the ``__main__`` script's stem (``head`` for
    ``python benchmarks/head.py``)."""
    main = getattr(sys.modules.get("__main__"), "__file__", None) or (sys.argv[0] if sys.argv else "")
    return Path(main).stem or "interactive"


def git_commit(repo: Path = RESULTS_DIR.parent.parent) -> str | None:
    """HEAD of the checkout the benchmark runs from, ``-dirty`` appended when tracked files
    differ from it; None outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def write_result(headline: dict, name: str | None = None, results_dir: Path | None = None) -> Path:
    """Write a benchmark's headline figures (its last JSON line; a ``targets`` entry is kept
    apart) to ``results_dir/<name>.json`` (default ``benchmarks/results/<calling script>.json``)
    with the UTC date, the git commit, the command line and the host; returns the path."""
    figures = dict(headline)
    targets = figures.pop("targets", None) or {}
    name = name or calling_script()
    record = {
        "benchmark": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "command": shlex.join(["python", *sys.argv]),
        "host": {"cpu_count": os.cpu_count(), "machine": platform.machine(),
                 "python": platform.python_version()},
        "results": strict_json(figures),
        "targets": targets,
    }
    folder = Path(results_dir or os.environ.get("EXPPORTRAIT_BENCH_RESULTS") or RESULTS_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, allow_nan=False, default=str) + "\n")
    tmp.replace(path)
    return path

def synthetic_corpus(work, identities: int, clips: int, frames: int, size: int, seed: int,
                     stale: tuple = (), log=print):
    """The benchmark's synthetic corpus in ``work/corpus``, reused when its config matches;
    otherwise regenerated, and the ``stale`` folders under ``work`` (outputs of another corpus)
    removed first."""
    import shutil
    import time
    from pathlib import Path

    from models.head.resolve import synthetic_model_file
    from preprocessing.synthetic.world import WorldConfig, generate_corpus
    corpus = Path(work) / "corpus"
    config = WorldConfig(identities=identities, clips_per_identity=clips, frames=frames, size=size, seed=seed)
    meta = corpus / "world.json"
    if meta.is_file():
        saved = json.loads(meta.read_text())["config"]
        if all(saved[k] == getattr(config, k) for k in ("identities", "clips_per_identity", "frames", "size", "seed")):
            log(f"corpus: reusing {corpus}")
            return corpus
    for folder in (corpus, *(Path(work) / s for s in stale)):
        shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    generate_corpus(corpus, config, synthetic_model_file(0), progress=False)
    log(f"corpus: {identities} identities x {clips} clips x {frames} frames at {size}² in "
        f"{time.perf_counter() - t0:.0f} s")
    return corpus
