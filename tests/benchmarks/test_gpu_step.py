"""benchmarks/gpu_step.py on CPU at a tiny width (one process, DeepSpeed ZeRO-2 bf16 through the
project's CPUDeepSpeedStrategy): it trains, times the step and reports its figures; the real
shape without a GPU is exit 2 with the JSON line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_step.py"


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, EXPPORTRAIT_BENCH_RESULTS=str(tmp_path), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               TMPDIR=str(tmp_path))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))   # as tests/training
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          env=env, cwd=tmp_path)


def test_tiny_width_step_on_cpu_reports_time_memory_and_shape(tmp_path):
    out = _run(tmp_path, "--width-override", "64", "--layers-override", "1", "--frames", "5", "--size", "32",
               "--steps", "1", "--warmup", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["device"] == "cpu" and line["shape"] == "1x5x32x32"
    assert line["width"] == 64 and line["layers"] == 1 and line["timed_steps"] == 1
    assert line["step_s"] > 0 and line["peak_mem_gb"] > 0.1          # RSS of a process holding torch
    assert line["mfu"] is None                                         # no known peak for a CPU
    assert line["train_tflops_per_step"] >= 0 and line["strategy"] == "deepspeed zero-2 bf16"
    saved = json.loads((tmp_path / "gpu_step.json").read_text())       # via _report.report
    assert saved["results"]["step_s"] == line["step_s"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the real shape runs")
def test_real_shape_without_a_gpu_is_exit_2(tmp_path):
    out = _run(tmp_path)
    assert out.returncode == 2
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["exit_code"] == 2 and "needs a GPU" in line["message"] and "--width-override" in line["message"]
    assert not (tmp_path / "gpu_step.json").exists()


def test_default_shape_is_the_wan13b_recipes():
    """Without overrides the step is the recipe's: the wan1.3b flavor, 33 frames at 512², its
    batch and gradient checkpointing; MFU's numerator is 3 x the analytic forward."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_step
    from models.generator.flops import analytic_forward_flops, training_flops

    shape = gpu_step.step_shape(gpu_step.parse_args([]))
    f = shape["flavor"]
    assert (shape["flavor_name"], shape["frames"], shape["size"], shape["batch"]) == ("wan1.3b", 33, 512, 1)
    assert (f.dim, f.num_layers, f.ffn_dim) == (1536, 30, 8960) and shape["checkpointing"] and not shape["overridden"]
    assert training_flops(f, 33, 512, 512) == 3 * analytic_forward_flops(f, 33, 512, 512)["dit"]
    tiny = gpu_step.step_shape(gpu_step.parse_args(["--width-override", "64", "--layers-override", "1"]))
    assert (tiny["flavor"].dim, tiny["flavor"].num_layers, tiny["overridden"]) == (64, 1, True)
