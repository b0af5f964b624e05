import json

import av
import numpy as np
from PIL import Image

from expportrait.cli import main
from expportrait.commands.head import SWEEP


def test_head_render_writes_video_maps_and_mesh(tmp_path, synthetic_model_path, capsys):
    out = tmp_path / "render"
    code = main(["head", "render", "--model", str(synthetic_model_path), "--out", str(out),
                 "--size", "64", "--frames-per-segment", "3", "--backend", "torch"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["frames"] == 3 * len(SWEEP)
    with av.open(summary["video"]) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 3 * len(SWEEP) and frames[0].shape == (64, 3 * 64, 3)
    normal = np.array(Image.open(out / "smile_normal.png"))
    depth = np.array(Image.open(out / "smile_depth_mm.png"))
    mask = np.array(Image.open(out / "smile_mask.png"))
    assert normal.shape == (64, 64, 3) and depth.dtype == np.uint16
    assert set(np.unique(mask)) <= {0, 127, 255} and (mask == 255).any()
    assert ((depth > 700) == (mask > 0)).mean() > 0.99
    assert (out / "personalized_neutral.ply").stat().st_size > 0


def test_missing_model_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("EXPPORTRAIT_SMPLX_PATH", raising=False)
    code = main(["head", "render", "--model", str(tmp_path / "absent.npz"), "--out", str(tmp_path)])
    assert code == 2
    err = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert err["error"] == "HeadModelFileError" and "absent.npz" in err["message"]


def test_synth_corpus_command(tmp_path, synthetic_model_path, capsys):
    import pandas as pd
    code = main(["synth", "corpus", "--out", str(tmp_path / "c"), "--identities", "2",
                 "--clips-per-identity", "1", "--frames", "6", "--size", "64",
                 "--model", str(synthetic_model_path)])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["clips"] == 2 and out["frames"] == 12
    manifest = pd.read_parquet(out["manifest"])
    assert list(manifest["clip_id"]) == ["id000_clip00", "id001_clip00"]
    with av.open(str(tmp_path / "c" / manifest["video"][0])) as container:
        assert sum(1 for _ in container.decode(video=0)) == 6
