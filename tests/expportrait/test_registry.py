"""Registry handoff on a real MLflow sqlite store: register, alias, gate, fresh-process load and
run, head-model hash check. Tiny untrained models (real classes) stand in for trained ones."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from expportrait.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import log_training_run, tiny_corpus, tiny_exports  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")   # restored after the module

NAME = "expportrait"


@pytest.fixture(scope="module")
def store(tmp_path_factory, head, synthetic_model_path):
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tiny_exports(root / "train", head)
    run_id = log_training_run(uri, root / "train")
    corpus = tiny_corpus(root / "corpus", synthetic_model_path)
    return {"root": root, "uri": uri, "run_id": run_id, "corpus": corpus}


def _cli(capsys, *args) -> tuple[int, dict]:
    rc = main([str(a) for a in args])
    return rc, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def registered(store):
    from expportrait.registry import register, tracking_from
    tracking_from(store["uri"])
    return register(store["run_id"], NAME, "candidate", inference_overrides={"size": 64, "overlap": 2, "steps": 2})


def test_register_sets_alias_tags_signature_and_no_head_model_file(store, registered):
    import mlflow
    client = mlflow.MlflowClient()
    mv = client.get_model_version_by_alias(NAME, "candidate")
    assert int(mv.version) == registered["version"]
    assert mv.tags["data"] == "synthetic-test-corpus" and mv.tags["metrics.train_loss"] == "0.5"
    assert len(mv.tags["code_commit"]) == 40 and len(mv.tags["head_model_sha256"]) == 64
    info = mlflow.models.get_model_info(f"models:/{NAME}@candidate")
    assert [c["name"] for c in info.signature.inputs.to_dict()] == ["source", "driving"]
    assert [c["name"] for c in info.signature.outputs.to_dict()] == ["video", "status", "message"]
    assert {p.name for p in info.signature.params.params} == {"steps", "seed", "guidance"}
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@candidate"))
    assert (local / "input_example.json").is_file()
    package = local / "artifacts" / "package"
    meta = json.loads((package / "package.json").read_text())
    assert meta["head_model"]["sha256"] == mv.tags["head_model_sha256"]
    assert {"generator", "codec", "transfer"} <= set(meta["parts"])
    # inference as trained (the run's frames, shift, frame_stride), then the register overrides
    assert meta["inference"] == {**meta["inference"], "window": 5, "shift": 1.0, "frame_stride": 1, "steps": 2,
                                 "size": 64, "overlap": 2}
    assert not list(package.rglob("*.npz")), "the head model file must never be packed"
    # no preprocessing summary with the run's data: the job's defaults, packed whole and said so
    assert meta["format"] == "expportrait-package/2" and "defaults" in meta["preprocessing"]["source"]
    assert meta["preprocessing"]["stages"]["fps"] == 25.0 and "iters_expression" in meta["preprocessing"]["fit"]


def test_gate_refuses_and_names_the_metric_then_promotes(store, registered, tmp_path, capsys):
    from expportrait.registry import record_evaluation
    gate = tmp_path / "gate.yaml"
    gate.write_text("protocol: self\nthresholds:\n  psnr: {min: 10.0}\n  jitter_ratio: {max: 3.0}\n")
    v = registered["version"]
    rc, out = _cli(capsys, "promote", "--name", NAME, "--version", v, "--alias", "champion", "--gate", gate,
                   "--tracking-uri", store["uri"])
    assert rc == 2 and out["error"] == "GateRefused" and "psnr: not evaluated" in out["message"]
    record_evaluation(NAME, v, "self", {"psnr": 7.5, "jitter_ratio": 1.2}, run_id="r")
    rc, out = _cli(capsys, "promote", "--name", NAME, "--version", v, "--alias", "champion", "--gate", gate,
                   "--tracking-uri", store["uri"])
    assert rc == 2 and "psnr = 7.5 < min 10" in out["message"] and "jitter_ratio" not in out["message"]
    import mlflow
    with pytest.raises(mlflow.exceptions.MlflowException):
        mlflow.MlflowClient().get_model_version_by_alias(NAME, "champion")
    record_evaluation(NAME, v, "self", {"psnr": 12.0, "jitter_ratio": 1.2}, run_id="r")
    rc, out = _cli(capsys, "promote", "--name", NAME, "--version", v, "--alias", "champion", "--gate", gate,
                   "--tracking-uri", store["uri"])
    assert rc == 0 and out["checked"] == {"psnr": 12.0, "jitter_ratio": 1.2}
    assert str(mlflow.MlflowClient().get_model_version_by_alias(NAME, "champion").version) == str(v)


FRESH = r"""
import base64, json, sys, torch
torch.set_num_threads(1)
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/expportrait@champion")
data = lambda p: base64.b64encode(open(p, "rb").read()).decode()
rows = pd.DataFrame([{"source": data(sys.argv[1]), "driving": data(sys.argv[2])},
                     {"source": data(sys.argv[1]), "driving": "missing.mp4"}])
out = model.predict(rows, params={"steps": 1})
print(json.dumps(out.to_dict("records")))
"""


@pytest.mark.slow
def test_fresh_process_loads_champion_and_runs_on_cpu(store, registered, tmp_path):
    from expportrait.registry import promote
    import mlflow
    gate = tmp_path / "gate.yaml"
    gate.write_text("protocol: cross\nthresholds:\n  csim_sface: {min: -1.0}\n")
    from expportrait.registry import record_evaluation
    record_evaluation(NAME, registered["version"], "cross", {"csim_sface": 0.1}, run_id="r")
    promote(NAME, registered["version"], "champion", gate)
    clips = store["corpus"] / "clips"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"], "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", FRESH, clips / "id000_clip00.mp4", clips / "id001_clip00.mp4"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ok, bad = json.loads(proc.stdout.strip().splitlines()[-1])
    assert ok["status"] == "ok" and json.loads(ok["message"])["frames"] == 9, ok
    import av
    import base64
    (tmp_path / "out.mp4").write_bytes(base64.b64decode(ok["video"]))
    with av.open(str(tmp_path / "out.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (64, 64, 3)
    assert bad["status"] == "bad_input" and "'driving'" in bad["message"] and not (tmp_path / "missing.mp4").exists()
    assert str(mlflow.MlflowClient().get_model_version_by_alias(NAME, "champion").version) == str(registered["version"])


def test_mismatched_head_model_refuses_to_load(store, registered, tmp_path, synthetic_model_path, monkeypatch):
    import mlflow
    from models.head.resolve import HeadModelMismatchError
    with np.load(synthetic_model_path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["shapedirs"] = arrays["shapedirs"] * 1.01            # another head model, same layout
    other = tmp_path / "SMPLX_NEUTRAL.npz"
    np.savez(other, **arrays)
    monkeypatch.setenv("EXPPORTRAIT_SMPLX_PATH", str(other))
    with pytest.raises(HeadModelMismatchError, match="is not the one this model was trained with"):
        mlflow.pyfunc.load_model(f"models:/{NAME}@candidate")


@pytest.mark.slow
def test_evaluating_a_registered_version_stores_what_the_gate_reads(store, registered, tmp_path, capsys):
    from expportrait.registry import check_gate, load_gate, version_metrics
    rc, res = _cli(capsys, "evaluate", "--model", f"models:/{NAME}/{registered['version']}", "--protocol", "self",
                   "--data", store["corpus"], "--out", tmp_path / "eval", "--max-pairs", 1, "--max-frames", 5,
                   "--no-dlib", "--no-motion", "--tracking-uri", store["uri"])
    assert rc == 0, res
    stored = version_metrics(NAME, registered["version"], "self")
    assert stored["psnr"] == pytest.approx(res["model"]["psnr"], rel=1e-5)
    assert stored["l1"] == pytest.approx(res["model"]["l1"], rel=1e-5)
    gate = load_gate(Path(__file__).parents[2] / "configs" / "registry" / "gate.yaml")
    failures = check_gate(stored, gate)          # an untrained model cannot pass the production gate
    assert any(f.startswith("psnr") for f in failures)
    rc, out = _cli(capsys, "promote", "--name", NAME, "--version", registered["version"], "--alias", "prod",
                   "--tracking-uri", store["uri"])
    assert rc == 2 and "psnr" in out["message"]


def test_gate_config_and_checks(tmp_path):
    from expportrait.registry import check_gate, load_gate
    gate = load_gate(Path(__file__).parents[2] / "configs" / "registry" / "gate.yaml")
    assert gate["protocol"] == "self" and "psnr" in gate["thresholds"]
    rules = {"protocol": "self",
             "thresholds": {"psnr": {"min": 20}, "jitter_ratio": {"max": 2}, "csim_sface": {"min": 0.4}}}
    assert check_gate({"psnr": 25.0, "jitter_ratio": 1.0, "csim_sface": 0.5}, rules) == []
    fails = check_gate({"psnr": 25.0, "jitter_ratio": 2.5, "csim_sface": float("nan")}, rules)
    assert fails == ["jitter_ratio = 2.5 > max 2",
                     "csim_sface: not measurable in the evaluation (NaN, e.g. no face found)"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("thresholds:\n  psnr: {above: 3}\n")
    with pytest.raises(ValueError, match="psnr"):
        load_gate(bad)


def test_inference_settings_follow_the_recipe_and_the_generator_run():
    """The run's recipe, then what it logged it samples with (window, stride, shift, steps;
    size null -> the crop size), then overrides; no recipe: the class defaults."""
    from dataclasses import replace

    from expportrait.reenactment import InferenceSettings
    from expportrait.recipes import load_recipe
    from expportrait.registry import inference_from_run
    sampling = {"window": 5, "frame_stride": 5, "size": None, "shift": 1.0, "steps": 10, "guidance": 1.0}
    st = inference_from_run(sampling, None, crop_size=48)
    assert (st.window, st.frame_stride, st.size, st.shift, st.steps, st.overlap) == (5, 5, 48, 1.0, 10, 2)
    assert inference_from_run(sampling, None, 48, {"size": 64, "steps": None}).size == 64
    assert inference_from_run(None, "wan1.3b") == load_recipe("wan1.3b").inference_settings()
    assert inference_from_run(None, None) == InferenceSettings()
    wan = inference_from_run({**sampling, "window": 33, "frame_stride": 1}, "wan1.3b", crop_size=512)
    assert wan == replace(load_recipe("wan1.3b").inference_settings(), steps=10, shift=1.0, guidance=1.0)
    with pytest.raises(ValueError, match="overlap"):
        inference_from_run(sampling, None, 48, {"overlap": 4})


def test_package_carries_the_jobs_whole_stage_spec(tmp_path, head, synthetic_model_path):
    """The job's stage spec (``summary.json`` ``stage_spec``) is packed whole and inference builds its
    stages from it: the frame rate is kept, with the crop size, field of view, fitter settings and
    the landmark embedding with its weights. Data without a job summary get the job's defaults
    (said so); a job summary without a spec is refused."""
    from expportrait.reenactment import Reenactor
    from models.head.resolve import head_model_reference
    from expportrait.registry import stage_spec_from_data
    from preprocessing.clip_records import StageConfig
    from preprocessing.clip_stages import stage_spec
    from tiny_models import tiny_exports
    spec = stage_spec(StageConfig(fps=30.0, crop_size=128, fov_deg=22.0, fit={"iters_rigid": 7}), synthetic_model_path)
    (tmp_path / "summary.json").write_text(json.dumps({"stages": spec["stages"], "stage_spec": spec}))
    packed = stage_spec_from_data(tmp_path, head_model_reference(None))
    assert packed == spec
    ex = tiny_exports(tmp_path / "m", head)
    from expportrait.reenactment import write_package
    pkg = write_package(tmp_path / "pkg", ex["generator"], ex["codec"], ex["transfer"], head_model_reference(None),
                        stage_spec=packed)
    assert json.loads((pkg / "package.json").read_text())["preprocessing"] == json.loads(json.dumps(spec))
    stages = Reenactor.from_package(pkg, device="cpu").stages
    assert stages.config.fps == 30.0 and stages.config.crop_size == 128 and stages.config.fov_deg == 22.0
    assert stages.fit_config.iters_rigid == 7 and stages.fit_config.fov_deg == 22.0
    assert stages.landmark_embedding is not None
    assert stages.landmark_embedding.digest() == spec["landmark_embedding"]["digest"]
    np.testing.assert_allclose(stages.landmark_embedding.weights(), spec["landmark_embedding"]["weights"], atol=1e-6)
    defaults = stage_spec_from_data(tmp_path / "absent", head_model_reference(None))
    assert defaults["stages"] == StageConfig().model_dump(mode="json") and "defaults" in defaults["source"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "summary.json").write_text(json.dumps({"stages": {"crop_size": 128}}))
    with pytest.raises(ValueError, match="no stage_spec"):
        stage_spec_from_data(tmp_path / "old", head_model_reference(None))


def test_an_old_package_is_refused_clearly(tmp_path, head, capsys):
    """A format-1 package (no stage spec) is refused, naming its format and what to do; the
    command exits 2 with its JSON line."""
    from expportrait.reenactment import PackageFormatError, Reenactor
    from tiny_models import tiny_package
    pkg = tiny_package(tmp_path, head, size=64, window=9, overlap=4, steps=2)
    meta = json.loads((pkg / "package.json").read_text())
    meta.update(format="expportrait-package/1", preprocessing={"crop_size": 256, "fov_deg": 20.0, "fit_seed": 0})
    (pkg / "package.json").write_text(json.dumps(meta))
    with pytest.raises(PackageFormatError, match="expportrait-package/1.*expportrait register"):
        Reenactor.from_package(pkg, device="cpu")
    from PIL import Image
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "b.mp4").write_bytes(b"")
    rc, err = _cli(capsys, "reenact", "--model", pkg, "--source", tmp_path / "a.png", "--driving", tmp_path / "b.mp4",
                   "--out", tmp_path / "o.mp4")
    assert rc == 2 and err["error"] == "PackageFormatError" and "expportrait-package/1" in err["message"]
