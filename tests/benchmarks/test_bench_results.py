"""Benchmarks save their headline to ``benchmarks/results/<script>.json`` and
``benchmarks/render_results.py`` renders those files into a Markdown page."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from benchmarks._report import write_result
from benchmarks.render_results import render

ROOT = Path(__file__).resolve().parents[2]


def test_report_saves_the_headline_under_the_calling_scripts_name(tmp_path):
    script = tmp_path / "tiny_bench.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / "benchmarks")!r})
        from _report import report
        report({{"speed_fps": 12.3456, "frames": 8, "broken": float("nan")}}, {{"speed_fps": ">= 10"}})
    """))
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(script), "--some-flag", "3"], capture_output=True, text=True,
                          env={**os.environ, "EXPPORTRAIT_BENCH_RESULTS": str(out)}, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed["speed_fps"] == 12.346 and printed["targets"] == {"speed_fps": ">= 10"}
    record = json.loads((out / "tiny_bench.json").read_text())
    assert record["benchmark"] == "tiny_bench"
    assert record["results"] == {"speed_fps": 12.346, "frames": 8, "broken": None}   # NaN: strict JSON
    assert record["targets"] == {"speed_fps": ">= 10"}
    assert record["command"].endswith("tiny_bench.py --some-flag 3")
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", record["commit"])
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$", record["date"])
    assert record["host"]["cpu_count"] == os.cpu_count()


def test_render_makes_a_table_per_benchmark_from_the_files_alone(tmp_path):
    write_result({"forward_fps": 1039.5, "mode": "cpu", "targets": {"forward_fps": 500}},
                 name="head", results_dir=tmp_path)
    write_result({"psnr_gain_db": 3.08, "load": {"start": 0.5}}, name="retired_bench", results_dir=tmp_path)
    (tmp_path / "notes.json").write_text("[1, 2]")          # not a results record: left out
    page = render(tmp_path)
    head = page.split("## `head`", 1)[1].split("\n## ", 1)[0]
    assert "| `forward_fps` | 1039.5 | 500 |" in head and "| `mode` | cpu |  |" in head
    assert "commit `" in head and "python " in head
    # scripts without a results file are listed as such, never given figures
    assert "## `fitting`" in page
    assert "No results file yet" in page.split("## `fitting`", 1)[1].split("\n## ", 1)[0]
    # a results file whose script is gone still shows, flagged; nested values as JSON
    retired = page.split("## `retired_bench`", 1)[1]
    assert "no script of this name" in retired and '`{"start": 0.5}`' in retired
    assert "## `notes`" not in page and "## `render_results`" not in page


def test_render_command_refuses_a_missing_results_folder(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "render_results.py"), "--results",
                           str(tmp_path / "missing"), "--out", str(tmp_path / "page.md")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert json.loads(proc.stdout.strip().splitlines()[-1])["error"] == "ResultsNotFound"
    assert not (tmp_path / "page.md").exists()
