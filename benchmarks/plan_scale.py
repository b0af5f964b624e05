"""Planning at scale: the preprocessing job's ``--dry-run`` on a generated manifest of a
million rows (no video is opened: the plan, the head-model check and the input checks).

    python benchmarks/plan_scale.py [--rows 1000000] [--clips-per-identity 4] [--clips-per-shard 8]

Side by side, on the same ids (a smaller slice, since the old way is quadratic): the
duplicate-id check the job used before (``ids.count(c)`` per id) against the linear one it
uses now (a ``Counter``). Last line: one JSON object with ``rows``, ``dry_run_seconds``
(wall time of the command, Python start included), ``job_seconds`` (what the job reports),
``rows_per_second`` and ``duplicate_check_speedup`` (old / new at ``--compare-rows``).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_manifest(path: Path, rows: int, clips_per_identity: int) -> None:
    import numpy as np
    import pandas as pd

    ids = [f"id{i // clips_per_identity:07d}" for i in range(rows)]
    pd.DataFrame({"path": [f"videos/{p}/clip{i % clips_per_identity}.mp4" for i, p in enumerate(ids)],
                  "identity_id": ids,
                  "split": np.where(np.arange(rows) % 50 == 0, "val", "train")}).to_parquet(path, index=False)


def duplicate_check_seconds(ids: list[str]) -> tuple[float, float]:
    t0 = time.perf_counter()
    old = sorted({c for c in ids if ids.count(c) > 1})           # the job's check until now
    t1 = time.perf_counter()
    new = sorted(c for c, n in Counter(ids).items() if n > 1)    # pipelines/job_io.list_inputs
    t2 = time.perf_counter()
    assert old == new
    return t1 - t0, t2 - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--clips-per-identity", type=int, default=4)
    ap.add_argument("--clips-per-shard", type=int, default=8)
    ap.add_argument("--compare-rows", type=int, default=20_000)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "manifest.parquet"
        t0 = time.perf_counter()
        write_manifest(manifest, args.rows, args.clips_per_identity)
        print(f"generated a {args.rows:,}-row manifest in {time.perf_counter() - t0:.1f} s")
        config = Path(tmp) / "job.yaml"
        config.write_text(f"clips_per_shard: {args.clips_per_shard}\n")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pipelines.preprocess", "--config", str(config),
                               "--input", str(manifest), "--output", str(Path(tmp) / "out"), "--dry-run"],
                              cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(proc.stdout[-2000:] + proc.stderr[-2000:])
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"dry run: {result['inputs']:,} inputs, {result['shards']:,} shards, {result['identities']:,} "
          f"identities in {wall:.1f} s wall ({result['seconds']:.1f} s inside the job)")
    ids = [f"id{i // args.clips_per_identity:07d}_clip{i % args.clips_per_identity}"
           for i in range(args.compare_rows)]
    old, new = duplicate_check_seconds(ids)
    print(f"duplicate-id check on {args.compare_rows:,} ids: before {old:.2f} s (quadratic: ~"
          f"{old * (args.rows / args.compare_rows) ** 2 / 3600:.0f} h at {args.rows:,}), now {new * 1000:.1f} ms")
    headline = {"rows": result["inputs"], "shards": result["shards"], "dry_run_seconds": round(wall, 2),
                "job_seconds": result["seconds"], "rows_per_second": round(result["inputs"] / wall),
                "duplicate_check_speedup": round(old / max(new, 1e-9)), "compare_rows": args.compare_rows}
    print(json.dumps(headline))
    from _report import write_result           # benchmarks/results/plan_scale.json
    write_result(headline)


if __name__ == "__main__":
    main()
