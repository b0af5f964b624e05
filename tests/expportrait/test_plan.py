"""`expportrait plan`: the table and its assumptions print, the JSON line has the figures, the
figures scale with the corpus, the measured numbers name their result file and the missing ones
fall back to stated defaults, and a user's mistake is exit 2 with the JSON line."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from expportrait.cli import main
from expportrait.plan import PlanInputs, make_plan
from models.generator.flops import training_flops

REPO = Path(__file__).resolve().parents[2]
KEYS = {"recipe", "flavor", "clips", "samples", "tokens_per_sample", "forward_tflops_per_sample",
        "train_tflops_per_sample", "cpu_core_hours_preprocess", "gpu_hours_latents", "gpu_hours_normals",
        "gpu_hours_train", "shard_bytes", "latent_bytes", "nodes_preprocess_cpu", "nodes_precompute_gpu",
        "nodes_train_gpu", "global_batch", "train_steps", "assumptions"}
LINEAR = ("samples", "cpu_core_hours_preprocess", "gpu_hours_latents", "gpu_hours_normals", "gpu_hours_train",
          "shard_bytes", "latent_bytes")


def _cli(capsys, *args) -> tuple[int, list[str], dict]:
    try:
        rc = main([str(a) for a in args])
    except SystemExit as stop:
        rc = stop.code
    lines = capsys.readouterr().out.strip().splitlines()
    return rc, lines, json.loads(lines[-1])


def test_wan13b_plan_prints_its_table_assumptions_and_json(capsys):
    rc, lines, plan = _cli(capsys, "plan", "--recipe", "wan1.3b", "--clips", 100000)
    assert rc == 0
    assert KEYS <= set(plan)
    text = "\n".join(lines[:-1])
    for row in ("CPU decode+track+fit", "GPU VAE latents", "GPU normal precompute", "GPU training",
                "shard bytes", "latent bytes", "preprocess in 1 d", "train in 7 d", "assumptions"):
        assert row in text, row
    for key, a in plan["assumptions"].items():       # every assumption printed with its source
        assert f"{key} = {a['value']:g}" in text and a["source"] in text
    assert {"train_mfu", "gpu_peak_bf16_tflops", "cpu_frames_per_core_s"} <= set(plan["assumptions"])
    # the recipe's shape: 33 frames at 512², 9 x 32 x 32 tokens, 3 x the analytic forward
    assert (plan["window"], plan["size"], plan["tokens_per_sample"]) == (33, 512, 9 * 32 * 32)
    assert plan["train_tflops_per_sample"] == pytest.approx(training_flops("wan1.3b", 33, 512, 512) / 1e12)
    assert plan["train_tflops_per_sample"] == pytest.approx(3 * plan["forward_tflops_per_sample"])
    # a day of preprocessing on the printed shape covers the core-hours
    assert plan["nodes_preprocess_cpu"] * 96 * 24 >= plan["cpu_core_hours_preprocess"]
    assert plan["nodes_train_gpu"] * 8 * 24 * 7 >= plan["gpu_hours_train"]


def test_figures_scale_linearly_with_clips(tmp_path):
    one = make_plan(PlanInputs("wan1.3b", clips=1000), results_dir=tmp_path)
    ten = make_plan(PlanInputs("wan1.3b", clips=10000), results_dir=tmp_path)
    for key in LINEAR:
        assert one[key] > 0 and ten[key] == pytest.approx(10 * one[key], rel=1e-9), key
    twice = make_plan(PlanInputs("wan1.3b", clips=1000, epochs=2), results_dir=tmp_path)
    assert twice["gpu_hours_train"] == pytest.approx(2 * one["gpu_hours_train"])


def test_measured_results_name_their_file_and_missing_ones_are_defaults(tmp_path):
    missing = make_plan(PlanInputs("wan1.3b", clips=10), results_dir=tmp_path)["assumptions"]
    assert "default assumption" in missing["cpu_frames_per_core_s"]["source"]
    assert "default assumption" in missing["reader_frames_per_core_s"]["source"]
    record = {"benchmark": "fitting", "date": "2026-01-02T03:04:05+00:00", "command": "python benchmarks/fitting.py",
              "results": {"fps": 2.0, "size": 256}, "targets": {}}
    (tmp_path / "fitting.json").write_text(json.dumps(record))
    shutil.copy(REPO / "benchmarks" / "results" / "generator_scale.json", tmp_path)
    measured = make_plan(PlanInputs("wan1.3b", clips=10), results_dir=tmp_path)
    cpu = measured["assumptions"]["cpu_frames_per_core_s"]
    assert cpu["value"] == 2.0 and "fitting.json (2026-01-02T03:04:05+00:00)" in cpu["source"]
    assert "generator_scale.json" in measured["assumptions"]["reader_frames_per_core_s"]["source"]
    before = make_plan(PlanInputs("wan1.3b", clips=10), results_dir=tmp_path / "none")
    # half the measured speed of the 4 frames/s default: twice the core-hours
    assert measured["cpu_core_hours_preprocess"] == pytest.approx(2 * before["cpu_core_hours_preprocess"])


@pytest.mark.parametrize("args, named", [(["--recipe", "no_such_recipe", "--clips", "10"], "no_such_recipe"),
                                         (["--recipe", "wan1.3b", "--clips", "0"], "'0'"),
                                         (["--recipe", "wan1.3b", "--clips", "-5"], "'-5'"),
                                         (["--recipe", "wan1.3b", "--clips", "10", "--gpu", "tpu"], "tpu")])
def test_bad_input_is_exit_2_with_the_json_line(capsys, args, named):
    rc, lines, line = _cli(capsys, "plan", *args)
    assert rc == 2 and named in line["message"] and line["exit_code"] == 2
    assert len(lines) == 1                           # before any work: no table


def test_plan_command_in_a_fresh_process():
    """The installed entry's path: ``python -m expportrait.cli plan``, last line JSON."""
    out = subprocess.run([sys.executable, "-m", "expportrait.cli", "plan", "--recipe", "tiny_cpu", "--clips", "3"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    plan = json.loads(out.stdout.strip().splitlines()[-1])
    assert plan["recipe"] == "tiny_cpu" and plan["flavor"] == "tiny_z48" and plan["clips"] == 3
    assert "assumptions (every number not taken from the recipe):" in out.stdout
