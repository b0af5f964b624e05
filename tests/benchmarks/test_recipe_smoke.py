"""benchmarks/recipe_smoke.py for the tiny_cpu recipe: its preprocessing (Ray job), transfer
module, codec, preflight, two-process DeepSpeed training at the recipe's shape and a resume from
the last checkpoint, end to end through the real entry points."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
# extended: the walk-through and the demo train this recipe; benchmarks/recipe_smoke.py runs all three
@pytest.mark.extended
def test_tiny_cpu_recipe_trains_and_resumes(tmp_path):
    env = dict(os.environ, EXPPORTRAIT_BENCH_RESULTS=str(tmp_path / "results"), PYTHONPATH=str(REPO),
               OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "recipe_smoke.py"), "--recipes", "tiny_cpu",
                           "--work", str(tmp_path / "work"), "--steps", "1", "--resume-steps", "1",
                           "--timeout", "900"], capture_output=True, text=True, timeout=1800, env=env, cwd=REPO)
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    tiny = line["tiny_cpu"]
    assert proc.returncode == 0 and line["ok"], (tiny.get("error"), proc.stdout[-3000:])
    assert tiny["ok"] and tiny["resumed"] and tiny["steps"] == 1 and tiny["resumed_steps"] == 2
    assert (tiny["window"], tiny["frame_stride"], tiny["size"], tiny["crop_size"]) == (5, 4, 32, 128)   # the recipe's
    assert tiny["strategy"].startswith("CPUDeepSpeedStrategy ZeRO-2") and tiny["minutes"]["resume"] > 0
    details = json.loads(Path(line["details"]).read_text())["tiny_cpu"]
    assert details["preflight"]["fits"] and details["preflight"]["window_span"] == 17
    assert details["preprocess"]["ok"] == details["preprocess"]["inputs"] == 3
    saved = json.loads((tmp_path / "results" / "recipe_smoke.json").read_text())
    assert saved["results"]["tiny_cpu"]["resumed"] is True
