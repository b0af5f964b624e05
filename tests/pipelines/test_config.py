"""Job configuration: every shipped config loads; mistakes are named."""
from pathlib import Path

import pytest

from pipelines.preprocess import ConfigError, load_config, main

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "preprocess").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.input and cfg.output and cfg.clips_per_shard >= 1
    assert cfg.stages.frame_codec in ("lossless", "h264")


def test_overrides_and_errors(tmp_path):
    cfg = load_config(CONFIGS[0], {"input": "x.csv", "limit": 3, "output": None})
    assert cfg.input == "x.csv" and cfg.limit == 3 and cfg.output != "None"
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: a\nstages: {fpss: 3}\n")
    with pytest.raises(ConfigError, match="fpss"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no input"):
        load_config(None)


def test_cli_exit_code_2_on_bad_input(tmp_path, capsys):
    assert main(["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o"), "--dry-run"]) == 2
    assert "does not exist" in capsys.readouterr().out
