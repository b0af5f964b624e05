"""`expportrait demo --quick`: the whole loop end to end in a fresh process (the CI's end-to-end
slice: corpus -> preprocessing job on embedded Ray -> transfer module, codec, generator ->
register -> gate -> promote -> reenact from the champion -> evaluate)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from processes import run_group

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_demo_runs_the_whole_loop(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    r = run_group([sys.executable, "-m", "expportrait.cli", "demo", "--quick", "--out", str(out)], cwd=REPO,
                  env=env, timeout=1500)      # its embedded Ray is stopped by process group
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["preprocess"]["ok"] == res["preprocess"]["inputs"] > 0, res["preprocess"]
    from training.data.shards import make_loader        # the demo's shards carry Δg and Δf
    batch = next(iter(make_loader(res["preprocess"]["output"], samples_per_rank=2, batch_size=2, num_workers=0)))
    assert batch["static_offsets"].abs().amax() > 0 and batch["dynamic_offsets"].abs().amax() > 0
    assert res["promote"]["alias"] == "champion" and res["promote"]["version"] == res["register"]["version"]
    for name, video in res["reenact"].items():                  # a failed pair would be "failed: ..."
        assert Path(video).is_file() and Path(video).stat().st_size > 0, (name, video)
    for protocol, ev in res["evaluate"].items():
        assert ev["pairs_failed"] == 0 and ev["pairs"] >= 1 and Path(ev["report"]).is_file(), (protocol, ev)
    assert 5 < res["evaluate"]["self"]["model"]["psnr"] < 100             # a real image, not a blank or a copy
    import mlflow
    client = mlflow.MlflowClient(res["tracking_uri"])
    champion = client.get_model_version_by_alias("expportrait", "champion")
    assert int(champion.version) == res["register"]["version"]
    runs = {k: client.get_run(v) for k, v in res["runs"].items()}
    assert all(run.info.status == "FINISHED" for run in runs.values())
    # the models were trained from the tiny_cpu recipe and the package carries its inference settings
    from dataclasses import asdict

    from expportrait.recipes import load_recipe
    assert runs["generator_run"].data.tags["recipe"] == "tiny_cpu" == res["recipe"]
    # the generator was fine-tuned from the shipped starting point, on its codec
    from training.export import read_init_folder
    init = read_init_folder("tiny_cpu")
    assert res["generator_init"] == str(init.root)
    params = runs["generator_run"].data.params
    assert str(init.generator) in params.values() and str(init.codec) in params.values(), params
    mlflow.set_tracking_uri(res["tracking_uri"])
    mlflow.set_registry_uri(res["tracking_uri"])
    package = Path(mlflow.artifacts.download_artifacts("models:/expportrait@champion")) / "artifacts" / "package"
    meta = json.loads((package / "package.json").read_text())
    assert meta["inference"] == asdict(load_recipe("tiny_cpu").inference_settings())
