"""A crafted checkpoint (a pickle whose loading would run code) is refused without running it:
checkpoints load with ``torch.load(weights_only=True)`` (training/export.py), the one loader that
export, ``expportrait generate --checkpoint`` and the registry use."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


class _Payload:
    """Unpickling this calls Path.touch(marker): proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def crafted_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": {}, "evil": _Payload(marker)}, path)
    return path, marker


def test_the_crafted_pickle_is_live_when_unpickled(tmp_path):
    """The payload works (so the refusal below is meaningful)."""
    path, marker = crafted_checkpoint(tmp_path)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_loader_refuses_a_crafted_checkpoint_without_running_it(tmp_path):
    from preprocessing.errors import UserError
    from training.export import load_checkpoint_state
    path, marker = crafted_checkpoint(tmp_path)
    with pytest.raises(UserError, match="not a checkpoint"):
        load_checkpoint_state(path)
    assert not marker.exists()


@pytest.mark.slow
def test_generate_command_refuses_a_crafted_checkpoint(tmp_path):
    import numpy as np
    from PIL import Image

    from preprocessing.video import write_video
    path, marker = crafted_checkpoint(tmp_path)
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "ref.png")     # valid inputs:
    write_video(tmp_path / "n.mp4", np.full((5, 32, 32, 3), 128, np.uint8), fps=25)    # the checkpoint is the issue
    proc = subprocess.run([sys.executable, "-m", "expportrait.cli", "generate", "--checkpoint", str(path),
                           "--reference", str(tmp_path / "ref.png"), "--normals", str(tmp_path / "n.mp4"),
                           "--out", str(tmp_path / "out.mp4")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert not marker.exists()
    assert proc.returncode == 2, proc.stdout + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "not a checkpoint" in line["message"] and str(path) in line["message"]
