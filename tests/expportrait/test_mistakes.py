"""A user's ordinary mistakes, tried as a new user would: each is exit 2 with one JSON line
naming the value, before any work and without a traceback (preprocessing/errors.py's wrapper).
Real MLflow sqlite stores in tmp_path, a registered tiny model (tests/expportrait/tiny_models.py)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from expportrait.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import log_training_run, tiny_corpus, tiny_exports, tiny_package

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[2]
NAME = "expportrait"


def _strict(text: str) -> dict:
    """One JSON line as a strict parser reads it (NaN/Infinity refused)."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def _cli(capsys, *args) -> tuple[int, dict, str]:
    """(exit code, last stdout line as strict JSON, stderr) of ``expportrait ARGS``; argparse's
    refusal (SystemExit) gives its code the same way."""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as stop:
        rc = stop.code
    out, err = capsys.readouterr()
    return rc, _strict(out.strip().splitlines()[-1]), err


def _mistake(capsys, *args) -> dict:
    rc, line, err = _cli(capsys, *args)
    assert rc == 2, line
    assert "Traceback" not in err, err
    assert line["exit_code"] == 2 and line["error"] and line["message"], line
    return line


@pytest.fixture(scope="module")
def store(tmp_path_factory, head, synthetic_model_path):
    """A sqlite store with one training run and one registered version (alias ``candidate``)."""
    from expportrait.registry import register, tracking_from
    root = tmp_path_factory.mktemp("mistakes_registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tiny_exports(root / "train", head)
    tracking_from(uri)
    run_id = log_training_run(uri, root / "train")
    registered = register(run_id, NAME, "candidate", inference_overrides={"size": 64, "overlap": 2, "steps": 1})
    return {"root": root, "uri": uri, "run_id": run_id, "version": registered["version"]}


# -- the registry: stores, aliases, versions, run ids, the gate --------------------------------
def test_unknown_alias_is_exit_2_naming_the_alias_and_the_aliases_there(store, tmp_path, capsys):
    line = _mistake(capsys, "reenact", "--model", f"models:/{NAME}@nope", "--source", "a.png", "--driving", "b.mp4",
                    "--out", tmp_path / "o.mp4", "--tracking-uri", store["uri"])
    assert line["alias"] == "nope" and "@nope" in line["message"] and "candidate" in line["message"]
    line = _mistake(capsys, "evaluate", "--model", f"models:/{NAME}@nope", "--data", tmp_path, "--out",
                    tmp_path / "eval", "--tracking-uri", store["uri"])
    assert line["alias"] == "nope"
    assert not (tmp_path / "o.mp4").exists()


def test_unknown_model_name_is_exit_2(store, tmp_path, capsys):
    line = _mistake(capsys, "reenact", "--model", "models:/nobody/1", "--source", "a.png", "--driving", "b.mp4",
                    "--out", tmp_path / "o.mp4", "--tracking-uri", store["uri"])
    assert line["name"] == "nobody" and NAME in line["message"]


def test_bogus_run_id_for_register_is_exit_2_naming_it(store, capsys):
    bogus = "0123456789abcdef0123456789abcdef"
    line = _mistake(capsys, "register", "--run", bogus, "--tracking-uri", store["uri"])
    assert line["run_id"] == bogus and bogus in line["message"]
    line = _mistake(capsys, "register", "--run", store["run_id"], "--transfer-run", "nope",
                    "--tracking-uri", store["uri"])
    assert line["run_id"] == "nope" and "--transfer-run" in line["message"]


def test_promote_a_version_that_does_not_exist_is_exit_2_naming_the_versions(store, capsys):
    line = _mistake(capsys, "promote", "--name", NAME, "--version", 99, "--tracking-uri", store["uri"])
    assert line["version"] == "99" and f"versions: [{store['version']}]" in line["message"]
    line = _mistake(capsys, "promote", "--name", NAME, "--version", "two", "--tracking-uri", store["uri"])
    assert line["error"] == "UsageError" and "'two'" in line["message"] and "--version" in line["message"]


def test_non_numeric_gate_threshold_is_exit_2_naming_metric_and_value(store, tmp_path, capsys):
    gate = tmp_path / "gate.yaml"
    gate.write_text("protocol: self\nthresholds:\n  psnr: {min: high}\n")
    line = _mistake(capsys, "promote", "--name", NAME, "--version", store["version"], "--gate", gate,
                    "--tracking-uri", store["uri"])
    assert line["metric"] == "psnr" and line["value"] == "high" and str(gate) in line["message"]


def test_a_typo_in_the_store_is_exit_2_and_creates_nothing(store, tmp_path, capsys):
    typo = tmp_path / "mlflw.db"
    line = _mistake(capsys, "promote", "--version", 1, "--tracking-uri", f"sqlite:///{typo}")
    assert str(typo) in line["message"] and line["tracking_uri"] == f"sqlite:///{typo}"
    assert not typo.exists()
    folder = tmp_path / "no_such_run"
    line = _mistake(capsys, "register", "--run", store["run_id"], "--store", folder)
    assert line["store"] == str(folder) and not folder.exists()
    line = _mistake(capsys, "reenact", "--model", f"models:/{NAME}@candidate", "--source", "a.png", "--driving",
                    "b.mp4", "--out", tmp_path / "o.mp4", "--tracking-uri", f"sqlite:///{typo}")
    assert not typo.exists()
    line = _mistake(capsys, "promote", "--version", 1, "--tracking-uri", "sqllite:///x.db")
    assert "'sqllite'" in line["message"]


def test_unreachable_tracking_server_fails_within_seconds(capsys):
    """A closed port on 127.0.0.1: exit 3 naming the URI after the short probe, not MLflow's
    minutes of retries (timed in-process: the imports of a fresh process are not the probe)."""
    with socket.socket() as s:                               # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    import expportrait.registry  # noqa: F401 - imported before the clock starts (mlflow, torch)
    t0 = time.perf_counter()
    rc, line, err = _cli(capsys, "promote", "--version", 1, "--tracking-uri", uri)
    seconds = time.perf_counter() - t0
    assert rc == 3 and line["error"] == "EnvironmentFault" and uri in line["message"], line
    assert "Traceback" not in err
    assert seconds < 10, seconds


@pytest.mark.slow
def test_a_real_tracking_server_passes_the_probe_and_lookups_name_what_is_missing(tmp_path, capsys):
    """``mlflow server`` on 127.0.0.1 (its own process group, killed after): the probe lets it
    through and an unknown model is the user's mistake naming it."""
    import signal
    import urllib.request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--default-artifact-root", (tmp_path / "artifacts").as_uri()],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(uri + "/health", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "mlflow server did not start"
                time.sleep(1)
        line = _mistake(capsys, "promote", "--name", "nobody", "--version", 1, "--tracking-uri", uri)
        assert line["name"] == "nobody" and uri in line["message"]
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


# -- numbers, files, output places ---------------------------------------------------------------
@pytest.mark.parametrize("flag,value", [("--size", "0"), ("--mouth", "nan"), ("--eyes", "inf"), ("--fps", "-5")])
def test_edit_and_transfer_refuse_numbers_out_of_range(flag, value, tmp_path, capsys):
    clip = tmp_path / "fit.npz"                       # never read: the arguments are refused first
    for command in (["edit", "--clip", clip], ["transfer", "--driver", clip, "--target", clip]):
        line = _mistake(capsys, *command, "--out", tmp_path / "o", flag, value)
        assert line["error"] == "UsageError" and flag in line["message"] and repr(value) in line["message"], line
    assert not (tmp_path / "o").exists()


def _reference_and_normals(tmp_path: Path) -> tuple[Path, Path]:
    from PIL import Image

    from preprocessing.video import write_video
    ref = tmp_path / "ref.png"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(ref)
    normals = write_video(tmp_path / "normals.mp4", [np.full((64, 64, 3), 128, np.uint8)] * 5, 25)
    return ref, Path(normals)


def test_a_text_file_as_checkpoint_is_exit_2_naming_it(tmp_path, capsys):
    ref, normals = _reference_and_normals(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    line = _mistake(capsys, "generate", "--checkpoint", text, "--codec", tmp_path, "--reference", ref, "--normals",
                    normals, "--out", tmp_path / "o.mp4")
    assert line["checkpoint"] == str(text) and "is not a checkpoint" in line["message"]
    assert not (tmp_path / "o.mp4").exists()


def test_reenact_to_an_unwritable_place_fails_before_the_work(store, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker / "out.mp4"                          # under a file: cannot be created, even as root
    t0 = time.perf_counter()
    line = _mistake(capsys, "reenact", "--model", f"models:/{NAME}@candidate", "--source", "a.png", "--driving",
                    "b.mp4", "--out", out, "--tracking-uri", store["uri"])
    assert line["path"] == str(out) and str(blocker) in line["message"]
    assert time.perf_counter() - t0 < 5                # the model was not loaded
    line = _mistake(capsys, "generate", "--weights", tmp_path, "--reference", "r.png", "--normals", "n.mp4",
                    "--out", out)
    assert line["path"] == str(out)


def test_summary_lines_are_strict_json(capsys):
    """A non-finite number in a result becomes null: strict parsers read every line."""
    from preprocessing.errors import run_command
    assert run_command(lambda: {"max": float("nan"), "rows": [float("inf"), 1.0]}) == 0
    line = _strict(capsys.readouterr().out.strip())
    assert line == {"max": None, "rows": [None, 1.0]}


def test_a_bug_is_still_exit_4_with_its_traceback(capsys):
    from preprocessing.errors import run_command

    def bug() -> dict:
        return {}["missing"]
    assert run_command(bug) == 4
    out, err = capsys.readouterr()
    assert "Traceback" in err and _strict(out.strip())["error"] == "InternalError"


# -- nothing outside the paths given; no MediaPipe chatter ---------------------------------------
@pytest.mark.slow
def test_evaluate_writes_nothing_in_the_working_folder(tmp_path, head, synthetic_model_path):
    package = tiny_package(tmp_path / "model", head, size=64, window=5, overlap=2, steps=1)
    corpus = tiny_corpus(tmp_path / "corpus", synthetic_model_path, frames=5)
    work = tmp_path / "cwd"
    work.mkdir()
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    proc = subprocess.run([sys.executable, "-m", "expportrait.cli", "evaluate", "--model", str(package),
                           "--data", str(corpus), "--out", str(tmp_path / "eval"), "--max-pairs", "1",
                           "--max-frames", "3", "--no-dlib", "--no-motion", "--tracking-uri", uri],
                          cwd=work, env={**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""},
                          capture_output=True, text=True, check=False, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _strict(proc.stdout.strip().splitlines()[-1])["tracking_uri"] == uri
    assert list(work.iterdir()) == [], list(work.iterdir())          # no ./mlruns
    assert (tmp_path / "store" / "mlartifacts").is_dir()


def test_face_tracking_prints_no_mediapipe_notices(single_face_video, tmp_path):
    """A short real track: MediaPipe's native `Feedback manager` / XNNPACK / absl lines are gone
    from stderr, while anything else written to stderr meanwhile still gets through."""
    script = f"""
import os, sys, av, numpy as np
from preprocessing import tracking
frames = []
with av.open({str(single_face_video)!r}) as c:
    for f in c.decode(video=0):
        frames.append(f.to_ndarray(format="rgb24"))
        if len(frames) >= 4:
            break
with tracking._without_mediapipe_notices():
    os.write(2, b"a real problem\\n")
print(tracking.FaceTracker().track(np.stack(frames)).status.value)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "ok"
    assert proc.stderr.count("Feedback manager") == 0 and "XNNPACK" not in proc.stderr, proc.stderr
    assert "a real problem" in proc.stderr
