"""`python -m training.train` in the shared command wrapper: a closing JSON line (run id,
checkpoint, export, steps) and a missing data root answered as a user's mistake before any
model is built."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "configs" / "train" / "transfer_tiny.yaml"


def _train(*args: str, timeout: int = 300) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "training.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, check=False, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    return proc, json.loads(lines[-1]) if lines else {}


def _small_run(tmp: Path, root: Path) -> Path:
    cfg = {"trainer": {"max_steps": 2, "max_epochs": 1, "enable_progress_bar": False, "log_every_n_steps": 1,
                       "limit_val_batches": 0,
                       "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                      "init_args": {"dirpath": None, "save_last": True}},
                                     {"class_path": "training.callbacks.EMA", "init_args": {"export_dir": None}}]},
           "model": {"init_args": {"vertex_samples": 256, "warmup_steps": 1}},
           "data": {"init_args": {"root": str(root), "batch_size": 2, "samples_per_epoch": 4, "val_samples": 2,
                                  "shuffle_buffer": 2}}}
    path = tmp / "small.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_fit_ends_with_one_json_line_naming_run_checkpoint_export_and_steps(tmp_path, truth_shards):
    out = tmp_path / "run"
    proc, line = _train("fit", "--config", str(BASE), "--config", str(_small_run(tmp_path, truth_shards)),
                        "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert line["command"] == "fit" and line["steps"] == 2, line
    assert len(line["run_id"]) == 32 and line["tracking_uri"] == f"sqlite:///{out.resolve() / 'mlflow.db'}"
    assert Path(line["checkpoint"]).is_file() and Path(line["checkpoint"]).parent == out / "checkpoints"
    assert (Path(line["export"]) / "config.json").is_file()
    # the checkpoint this run wrote loads without unpickling arbitrary objects
    from training.export import load_checkpoint_state
    assert "callbacks" in load_checkpoint_state(line["checkpoint"])


def test_missing_data_root_is_exit_2_naming_the_folder_before_model_setup(tmp_path):
    missing = tmp_path / "no_such_shards"
    t0 = time.perf_counter()
    proc, line = _train("fit", "--config", str(BASE), "--data.init_args.root", str(missing),
                        "--out", str(tmp_path / "run"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert line["error"] == "UserError" and str(missing) in line["message"] and line["root"] == str(missing)
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()                   # nothing was set up
    empty = tmp_path / "empty"
    empty.mkdir()
    proc, line = _train("fit", "--config", str(BASE), "--data.init_args.root", str(empty),
                        "--out", str(tmp_path / "run"))
    assert proc.returncode == 2 and str(empty) in line["message"] and "no finished train" in line["message"]
    assert time.perf_counter() - t0 < 120
