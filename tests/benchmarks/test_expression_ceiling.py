"""The expression read-out of ``benchmarks/expression_ceiling.py``: its normalization removes a
per-frame similarity, the ridge read-out recovers a linear code from points, bad arguments are exit 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.expression_ceiling import ALPHAS, Readout, choose_alpha, clip_psi_corr, normalize

ROOT = Path(__file__).resolve().parents[2]


def similarity_2d(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    angle = rng.uniform(-0.6, 0.6, n)
    rot = np.stack([np.stack([np.cos(angle), -np.sin(angle)], -1), np.stack([np.sin(angle), np.cos(angle)], -1)], -2)
    return rot, rng.uniform(50, 200, (n, 1, 1)), rng.uniform(0, 256, (n, 1, 2))


def test_normalize_removes_position_scale_and_in_plane_rotation():
    rng = np.random.default_rng(0)
    shape = rng.normal(size=(30, 2))
    frames = np.repeat(shape[None], 5, 0) + 0.01 * rng.normal(size=(5, 30, 2))
    rot, scale, shift = similarity_2d(rng, 5)
    moved = scale * np.einsum("fij,flj->fli", rot, frames) + shift
    a, reference = normalize(frames)
    b, _ = normalize(moved, reference)
    np.testing.assert_allclose(a, b, atol=1e-9)
    assert np.allclose(np.sqrt((a ** 2).sum((1, 2)) / 30), 1.0)


def test_readout_recovers_a_linear_expression_code_on_held_out_clips():
    rng = np.random.default_rng(1)
    template, basis = rng.normal(size=(40, 2)), 0.05 * rng.normal(size=(10, 40, 2))

    def clips(n: int, frames: int = 20):
        psi = rng.normal(size=(n * frames, 10))
        pts = template + np.einsum("fk,kli->fli", psi, basis) + 0.002 * rng.normal(size=(n * frames, 40, 2))
        rot, scale, shift = similarity_2d(rng, n * frames)
        return scale * np.einsum("fij,flj->fli", rot, pts) + shift, psi, np.repeat(np.arange(n), frames)

    pts, psi, clip = clips(12)
    alpha = choose_alpha(pts, psi, clip)
    assert alpha in ALPHAS
    test_pts, test_psi, test_clip = clips(3)
    assert clip_psi_corr(Readout(pts, psi, alpha)(test_pts), test_psi, test_clip) > 0.95
    noise = rng.normal(size=test_psi.shape)            # an unrelated code scores near 0
    assert abs(clip_psi_corr(noise, test_psi, test_clip)) < 0.2


def test_bad_arguments_are_exit_2_naming_the_value():
    for args, name in ((["--identities", "2"], "--identities"), (["--seed", "3"], "--seed")):
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "expression_ceiling.py"), *args],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert proc.returncode == 2, proc.stderr
        line = json.loads(proc.stdout.strip().splitlines()[-1])
        assert line["error"] == "BadArgument" and line["argument"] == name


@pytest.mark.extended
def test_the_script_reads_out_psi_from_rendered_tracked_clips(tmp_path):
    """The whole script at a tiny size (8 calibration identities, 2 evaluation clips, 8 frames):
    the job's render -> encode -> decode -> track path, one JSON line with every key, saved."""
    env = dict(os.environ, EXPPORTRAIT_BENCH_RESULTS=str(tmp_path), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "expression_ceiling.py"), "--identities", "8",
                           "--frames", "8", "--eval-clips", "2"], capture_output=True, text=True, timeout=900,
                          cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("mediapipe478", "mediapipe68", "true68"):
        assert -1 <= line[f"psi_corr_{name}"] <= 1 and line[f"alpha_{name}"] in ALPHAS
        assert len(line["per_coefficient_corr"][name]) == 10
    assert line["calibration_identities"] >= 4 and line["evaluation_frames"] > 0
    assert line["psi_corr_mediapipe478_by_identities"]
    assert json.loads((tmp_path / "expression_ceiling.json").read_text())["results"]["psi_corr_true68"] == \
        line["psi_corr_true68"]
