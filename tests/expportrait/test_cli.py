import json
import os
from pathlib import Path

import av
import numpy as np
import pytest
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


# `expportrait fit`: an input that cannot be fitted exits 2 with a one-line JSON error.

def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("flag", ["--video", "--image"])
def test_fit_missing_input_exits_2_naming_the_file(tmp_path, capsys, flag):
    missing = tmp_path / ("missing.mp4" if flag == "--video" else "missing.png")
    out = tmp_path / "out"
    code = main(["fit", flag, str(missing), "--out", str(out)])
    assert code == 2
    err = _last_json(capsys)
    assert err["error"] == "FitInputError" and err["status"] == "file_not_found"
    assert str(missing) in err["message"] and err["source"] == str(missing)
    assert not out.exists()                       # nothing written for an input that is not there


def test_fit_directory_and_unreadable_input_exit_2(tmp_path, capsys, monkeypatch):
    assert main(["fit", "--video", str(tmp_path), "--out", str(tmp_path / "o1")]) == 2
    assert _last_json(capsys)["status"] == "not_a_file"
    locked = tmp_path / "locked.mp4"
    locked.write_bytes(b"\x00" * 64)
    real_access = os.access
    # Tests may run as root, which reads any file whatever its mode: deny access for this file.
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    assert main(["fit", "--video", str(locked), "--out", str(tmp_path / "o2")]) == 2
    err = _last_json(capsys)
    assert err["status"] == "unreadable" and str(locked) in err["message"]


@pytest.fixture(scope="module")
def broken_videos(tmp_path_factory):
    import video_fixtures as vf
    d = tmp_path_factory.mktemp("broken")
    good = vf.write(d / "good.mp4", n=60)
    data = good.read_bytes()
    (d / "truncated.mp4").write_bytes(data[: len(data) * 2 // 5])
    (d / "zero.mp4").write_bytes(b"")
    (d / "text.mp4").write_text("this is not a video\n" * 20)
    return {"zero_byte": d / "zero.mp4", "truncated": d / "truncated.mp4", "text": d / "text.mp4",
            "audio_only": vf.audio_only(d / "audio.m4a"), "no_frames": vf.no_frames(d / "no_frames.mp4"),
            "no_face": good}


@pytest.mark.parametrize("name,status", [
    ("zero_byte", "not_a_video"), ("text", "not_a_video"), ("truncated", "corrupt_container"),
    ("audio_only", "no_video_stream"), ("no_frames", "zero_duration"), ("no_face", "no_face")])
def test_fit_unusable_video_exits_2_with_its_status(broken_videos, name, status, tmp_path, capsys,
                                                     synthetic_model_path):
    out = tmp_path / "out"
    code = main(["fit", "--video", str(broken_videos[name]), "--out", str(out),
                 "--model", str(synthetic_model_path)])
    assert code == 2
    err = _last_json(capsys)
    assert err["error"] == "FitInputError" and err["status"] == status
    assert str(broken_videos[name]) in err["message"]
    recorded = json.loads((out / "summary.json").read_text())
    assert recorded["status"] == status and not (out / "fit.npz").exists()


def test_fit_undecodable_image_exits_2(tmp_path, capsys):
    bad = tmp_path / "photo.png"
    bad.write_text("not an image")
    assert main(["fit", "--image", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = _last_json(capsys)
    assert err["status"] == "not_an_image" and str(bad) in err["message"]


def test_fit_image_ok_exits_0(tmp_path, capsys, synthetic_model_path):
    skimage_data = pytest.importorskip("skimage.data")
    photo = tmp_path / "astronaut.png"
    Image.fromarray(skimage_data.astronaut()).save(photo)
    out = tmp_path / "out"
    code = main(["fit", "--image", str(photo), "--out", str(out), "--model", str(synthetic_model_path),
                 "--no-overlay"])
    assert code == 0
    summary = _last_json(capsys)
    assert summary["status"] == "ok" and summary["frames"] == 1 and "error" not in summary
    assert (out / "fit.npz").exists() and json.loads((out / "summary.json").read_text())["status"] == "ok"


def test_fit_uses_the_landmark_embedding_and_its_weights(tmp_path, capsys, synthetic_model_path, monkeypatch):
    """``expportrait fit`` fits like the job's workers: the calibrated embedding's points and
    its per-point weights (all 478 points with theirs for a dense embedding); ``auto`` without a
    calibrated file says so on stderr."""
    import dataclasses

    import numpy as np

    import preprocessing.fitting as fitting
    from preprocessing import landmark_embedding
    skimage_data = pytest.importorskip("skimage.data")
    photo = tmp_path / "astronaut.png"
    Image.fromarray(skimage_data.astronaut()).save(photo)
    seen = []

    class SpyFitter(fitting.Fitter):
        """Records what the command builds the fitter with; fits briefly (the wiring is under test)."""
        def __init__(self, head, config=None, landmark_weights=None, dense_landmarks=None):
            seen.append((landmark_weights, dense_landmarks))
            config = dataclasses.replace(config or fitting.FitConfig(), iters_rigid=5, iters_expression=6,
                                         photo_registration=False, photometric=False)
            super().__init__(head, config, landmark_weights, dense_landmarks)

    import preprocessing.clip_stages as clip_stages
    monkeypatch.setattr(clip_stages, "Fitter", SpyFitter)        # the job's stages build the fitter
    args = ["fit", "--image", str(photo), "--model", str(synthetic_model_path), "--no-overlay"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    from models.head.smplx_file import load_smplx_model
    emb = landmark_embedding.resolve_embedding("auto", load_smplx_model(synthetic_model_path))
    weights, dense = seen[-1]
    np.testing.assert_array_equal(weights, emb.weights())
    assert emb.convention == "mediapipe_ibug68" and dense is None          # auto: the 68-point file
    dense_file = landmark_embedding.EMBEDDING_DIR / landmark_embedding.embedding_file(     # by path: every point
        landmark_embedding.DENSE_CONVENTION, emb.model_key)
    assert main(args + ["--landmark-embedding", str(dense_file), "--out", str(tmp_path / "c")]) == 0
    emb478 = landmark_embedding.LandmarkEmbedding.load(dense_file)
    weights, dense = seen[-1]
    np.testing.assert_array_equal(weights, emb478.weights())
    np.testing.assert_array_equal(dense[0], emb478.faces)
    np.testing.assert_array_equal(dense[2], emb478.dense_weights())
    capsys.readouterr()
    monkeypatch.setattr(landmark_embedding, "EMBEDDING_DIR", tmp_path / "none_here")
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    assert seen[-1] == (None, None)
    assert "no calibrated file" in capsys.readouterr().err


def test_environment_faults_and_bugs_have_their_own_exit_codes(tmp_path, capsys, monkeypatch):
    """A full disk is exit 3, an unexpected exception exit 4, each with its one-line JSON."""
    import errno
    import json

    from expportrait import cli
    from expportrait.commands import synth

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path))

    def bug(args):
        raise KeyError("oops")

    for func, code, error in ((full, 3, "EnvironmentFault"), (bug, 4, "InternalError")):
        monkeypatch.setattr(synth, "corpus", func)          # what `synth corpus` runs
        assert cli.main(["synth", "corpus", "--out", str(tmp_path / "c")]) == code
        line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert line["error"] == error
    assert "KeyError" in line["message"]
