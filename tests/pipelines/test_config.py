"""Job configuration: every shipped config loads; every mistake is an exit 2 with a one-line
JSON error that names the key (checked through the command line, ``--dry-run``: no Ray)."""
import json
from pathlib import Path

import numpy as np

import pytest
import yaml

from pipelines.preprocess import EXIT_BAD_INPUT, EXIT_OK, ConfigError, load_config, main

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "preprocess").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.input and cfg.output and cfg.clips_per_shard >= 1
    assert cfg.stages.frame_codec in ("lossless", "h264")


def test_overrides_and_errors(tmp_path):
    cfg = load_config(CONFIGS[0], {"input": "x.csv", "limit": 3, "output": None})
    assert cfg.input == "x.csv" and cfg.limit == 3 and cfg.output != "None"
    with pytest.raises(ConfigError, match="no input"):
        load_config(None)


def _cli(capsys, *args) -> tuple[int, dict]:
    code = main(list(args))
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) >= 1
    return code, json.loads(lines[-1])


@pytest.fixture()
def videos(tmp_path):
    d = tmp_path / "videos" / "person"
    d.mkdir(parents=True)
    (d / "a.mp4").write_bytes(b"not decoded by a dry run")
    return tmp_path / "videos"


BAD_VALUES = [
    # (config, the key the message must name, a word of the allowed values)
    ({"clips_per_shard": "four"}, "clips_per_shard", "integer"),
    ({"clips_per_shard": 0}, "clips_per_shard", "greater than or equal to 1"),
    ({"max_failure_ratio": 1.5}, "max_failure_ratio", "less than or equal to 1"),
    ({"limit": -1}, "limit", "greater than or equal to 1"),
    ({"subdivision": 7}, "subdivision", "less than or equal to 3"),
    ({"clip_per_shard": 4}, "clip_per_shard", "known: clips_per_shard"),
    ({"stages": {"frame_codec": "vp9"}}, "stages.frame_codec", "'lossless' or 'h264'"),
    ({"stages": {"segment_frames": 0}}, "stages.segment_frames", "greater than or equal to 1"),
    ({"stages": {"fps": "fast"}}, "stages.fps", "number"),
    ({"stages": {"fov_deg": 200}}, "stages.fov_deg", "less than 179"),
    ({"stages": {"max_bad_frames": -0.1}}, "stages.max_bad_frames", "greater than or equal to 0"),
    ({"stages": {"min_frames": 50, "max_frames": 10}}, "max_frames (10) is below min_frames", "min_frames"),
    ({"stages": {"fit": {"iters_expresion": 60}}}, "stages.fit.iters_expresion", "known: batch_frames"),
    ({"stages": {"fit": {"iters_expression": "many"}}}, "stages.fit.iters_expression", "integer"),
    ({"stages": {"fit": {"w_temporal": -1}}}, "stages.fit.w_temporal", "greater than or equal to 0"),
    ({"stages": {"estimator": "not a factory"}}, "stages.estimator", "pattern"),
    ({"stages": {"renderdepth": True}}, "stages.renderdepth", "known:"),
    ({"workers": {"num_cpus": 0}}, "workers.num_cpus", "greater than 0"),
    ({"workers": {"max_retries": -1}}, "workers.max_retries", "greater than or equal to 0"),
    ({"workers": {"queue_depth": 1}}, "workers.queue_depth", "known: autoscale_extra_workers"),
    ({"ray": {"object_store_mb": 10}}, "ray.object_store_mb", "greater than or equal to 80"),
    ({"ray": {"dashboard_port": 70000}}, "ray.dashboard_port", "less than or equal to 65535"),
    ({"fault_injection": {"kill_worker": ["x"]}}, "fault_injection", "unknown key"),
]


@pytest.mark.parametrize("data,key,allowed", BAD_VALUES, ids=[k for _, k, _ in BAD_VALUES])
def test_bad_values_exit_2_naming_the_key(tmp_path, capsys, videos, data, key, allowed):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    code, result = _cli(capsys, "--config", str(path), "--input", str(videos), "--dry-run")
    assert code == EXIT_BAD_INPUT == result["exit_code"] and result["error"] == "ConfigError"
    assert key in result["message"] and allowed in result["message"], result["message"]


def test_yaml_error_has_line_and_column(tmp_path, capsys, videos):
    path = tmp_path / "job.yaml"
    path.write_text("clips_per_shard: 4\nstages:\n  fps: 25\n segment_frames: 8\n")
    code, result = _cli(capsys, "--config", str(path), "--input", str(videos), "--dry-run")
    assert code == EXIT_BAD_INPUT and "YAML error at line 4, column 2" in result["message"]
    path.write_text("- a list\n- not a mapping\n")
    code, result = _cli(capsys, "--config", str(path), "--input", str(videos), "--dry-run")
    assert code == EXIT_BAD_INPUT and "must be a mapping" in result["message"]
    code, result = _cli(capsys, "--config", str(tmp_path / "nope.yaml"), "--input", str(videos), "--dry-run")
    assert code == EXIT_BAD_INPUT and "not found" in result["message"]


@pytest.mark.parametrize("content", [b"hello, not a model", b"", None], ids=["text", "empty", "npz_missing_keys"])
def test_a_head_model_that_is_not_one_is_exit_2_also_in_a_dry_run(tmp_path, capsys, videos, content):
    model = tmp_path / "model.npz"
    if content is None:
        import numpy as np
        np.savez(model, v_template=np.zeros((10, 3)))
    else:
        model.write_bytes(content)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"head_model": str(model)}))
    code, result = _cli(capsys, "--config", str(path), "--input", str(videos), "--dry-run")
    assert code == EXIT_BAD_INPUT and result["message"].startswith("head_model:") and str(model) in result["message"]


def test_missing_input_and_duplicate_ids_are_exit_2(tmp_path, capsys, videos):
    code, result = _cli(capsys, "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o"), "--dry-run")
    assert code == EXIT_BAD_INPUT and "does not exist" in result["message"]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,identity_id,clip_id\na.mp4,p,c1\nb.mp4,p,c1\n")
    code, result = _cli(capsys, "--input", str(manifest), "--dry-run")
    assert code == EXIT_BAD_INPUT and "duplicate clip id" in result["message"] and "c1" in result["message"]


def test_dry_run_checks_and_plans(tmp_path, capsys, videos):
    code, result = _cli(capsys, "--input", str(videos), "--output", str(tmp_path / "o"), "--dry-run")
    assert code == EXIT_OK and result["inputs"] == 1 and result["pending_clips"] == 1
    assert result["plan_head"][0]["clips"] == ["person_a"] and not (tmp_path / "o").exists()


def test_argument_errors_are_exit_2_with_the_json_line(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--limit", "many", "--dry-run"])
    assert stop.value.code == EXIT_BAD_INPUT
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["error"] == "UsageError" and "--limit" in line["message"]


def test_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for line in ("0  done", "1  done, but more clips failed", "2  bad configuration or input",
                 "3  environment fault", "4  internal error"):
        assert line in text


def test_a_landmark_embedding_of_another_model_or_unreadable_is_exit_2(tmp_path, capsys, videos):
    from preprocessing.landmark_embedding import LandmarkEmbedding
    other = LandmarkEmbedding(faces=np.arange(68), bary=np.full((68, 3), 1 / 3, np.float32), model_key="0" * 16,
                              residual_pct=np.ones(68), model_residual_pct=np.ones(68),
                              frames=1).save(tmp_path / "o.npz")
    for setting, message in ((other, "made for model"), (tmp_path / "missing.npz", "missing.npz")):
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump({"stages": {"landmark_embedding": str(setting)}}))
        code, result = _cli(capsys, "--config", str(path), "--input", str(videos), "--dry-run")
        assert code == EXIT_BAD_INPUT and result["message"].startswith("stages.landmark_embedding:"), result
        assert message in result["message"]


def test_the_stage_fingerprint_covers_the_fitters_resolved_settings(monkeypatch):
    """Setting a fitter option to its default is the same fingerprint; a changed default (a
    new release) is a different one, so a resumed job refits."""
    import preprocessing.clip_records as records
    from pipelines.preprocess import stage_fingerprint
    from preprocessing.fitting import FitConfig

    base = load_config(Path("configs/preprocess/local.yaml"))
    explicit = base.model_copy(deep=True)
    explicit.stages.fit = {"photo_registration": FitConfig().photo_registration}
    assert stage_fingerprint(base, "sha") == stage_fingerprint(explicit, "sha")
    before = stage_fingerprint(base, "sha")
    field = FitConfig.__dataclass_fields__["photo_registration"]      # what fit_options_model reads
    monkeypatch.setattr(field, "default", not field.default)
    records.fit_options_model.cache_clear()
    try:
        assert stage_fingerprint(base, "sha") != before
    finally:
        monkeypatch.undo()
        records.fit_options_model.cache_clear()
