"""benchmarks/generator.py's bookkeeping of the cross pairs: motion ratios over the pairs fitted
on both sides, fitted clips kept without pickle."""
from __future__ import annotations

import math

import numpy as np

from benchmarks.generator import motion_ratio, motion_summary, read_fitted, write_fitted

NAN = float("nan")


def test_motion_ratio_compares_only_pairs_fitted_on_both_sides():
    motion = {"model_vs_driver": {"a|b": {"aed": 0.2, "apd_deg": 4.0}, "c|d": {"aed": NAN, "apd_deg": NAN},
                                  "e|f": {"aed": 0.4, "apd_deg": 8.0}},
              "copy_vs_driver": {"a|b": {"aed": 0.4, "apd_deg": 10.0}, "c|d": {"aed": 0.1, "apd_deg": 1.0},
                                 "e|f": {"aed": 0.4, "apd_deg": 10.0}}}
    assert motion_ratio(motion, "model", "copy", "driver", "apd_deg") == 0.6      # (4 + 8) / (10 + 10)
    assert motion_ratio(motion, "model", "copy", "driver", "aed") == 0.75
    assert motion_ratio(motion, "model", "copy", "truth", "aed") is None          # nothing measured
    summary = motion_summary(motion)
    assert summary["model_vs_driver"]["pairs_fitted"] == 2 and summary["copy_vs_driver"]["pairs_fitted"] == 3
    assert math.isclose(summary["model_vs_driver"]["apd_deg"], 6.0)
    assert motion_summary({"model_vs_truth": {"a|b": {"aed": NAN, "apd_deg": NAN}}})["model_vs_truth"] == \
        {"aed": None, "apd_deg": None, "pairs_fitted": 0}                        # strict JSON


def test_fitted_clip_round_trip(tmp_path):
    from preprocessing.fitted_clip import FittedClip
    rng = np.random.default_rng(0)
    clip = FittedClip({"expression": rng.normal(size=(3, 10)).astype(np.float32),
                       "camera_K": rng.normal(size=(3, 3, 3)).astype(np.float32)},
                      rng.normal(size=300).astype(np.float32), rng.normal(size=(7, 3)).astype(np.float32), 32,
                      "clip.mp4#4", rng.normal(size=(3, 5, 3)).astype(np.float32))
    write_fitted(clip, tmp_path / "fit.npz")
    back = read_fitted(tmp_path / "fit.npz")
    assert back.image_size == 32 and back.source == "clip.mp4#4" and back.arrays.keys() == clip.arrays.keys()
    for k in clip.arrays:
        assert np.array_equal(back.arrays[k], clip.arrays[k])
    for k in ("betas", "static_offsets", "dynamic_offsets"):
        assert np.array_equal(getattr(back, k), getattr(clip, k))
