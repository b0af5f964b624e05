"""`expportrait evaluate` end to end on a tiny package and a tiny synthetic corpus: report with
videos and plots, metrics next to the copy baseline, an MLflow run."""
from __future__ import annotations

import json
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from expportrait.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import tiny_corpus, tiny_exports  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")   # restored after the module


@pytest.fixture(scope="module")
def package(tmp_path_factory, head):
    from expportrait.reenactment import InferenceSettings, write_package
    from models.head.resolve import head_model_reference
    root = tmp_path_factory.mktemp("evalpkg")
    ex = tiny_exports(root, head)
    return write_package(root / "package", ex["generator"], ex["codec"], ex["transfer"], head_model_reference(None),
                         InferenceSettings(size=64, window=5, overlap=2, frame_stride=1, steps=2, shift=5.0))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, synthetic_model_path):
    return tiny_corpus(tmp_path_factory.mktemp("evalcorpus"), synthetic_model_path, frames=7, identities=2)


class _Media(HTMLParser):
    def __init__(self):
        super().__init__()
        self.videos, self.images = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "video":
            self.videos.append(a["src"])
        elif tag == "img":
            self.images.append(a["src"])


@pytest.mark.slow
# self: `expportrait demo` (the quick demo in CI) evaluates that protocol through the same command
@pytest.mark.parametrize("protocol", [pytest.param("self", marks=pytest.mark.extended), "cross"])
def test_evaluate_writes_report_with_videos_and_logs_to_mlflow(tmp_path, package, corpus, protocol, capsys):
    out = tmp_path / "eval"
    rc = main(["evaluate", "--model", str(package), "--protocol", protocol, "--data", str(corpus), "--out", str(out),
               "--max-pairs", "1", "--no-dlib"] + (["--no-motion"] if protocol == "self" else []))
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0, res
    assert res["pairs"] == 1 and res["pairs_failed"] == 0
    page = (out / "report.html").read_text()
    media = _Media()
    media.feed(page)
    assert len(media.videos) == 1 and (out / media.videos[0]).stat().st_size > 0
    assert media.images and all((out / p).is_file() for p in media.images)
    assert "copy-reference baseline" in page and "not ArcFace" in page and "LPIPS skipped" in page
    metrics = json.loads((out / "metrics.json").read_text())
    if protocol == "self":        # the copy baseline is scored against the ground truth too
        assert 0 < metrics["model"]["psnr"] < 100 and metrics["copy"]["psnr"] > metrics["model"]["psnr"]
        assert metrics["model"]["psnr_vs_copy"] == pytest.approx(metrics["model"]["psnr"] - metrics["copy"]["psnr"])
    else:
        assert "psnr" not in metrics["model"] and metrics["copy"]["csim_sface"] == pytest.approx(1.0)
        assert metrics["copy"]["apd_deg"] >= 0                                  # AED/APD vs the driver's fit
        assert metrics["copy"]["apd_motion_deg"] >= 0 and "apd_motion_deg_vs_copy" in metrics["model"]
    import mlflow
    run = mlflow.MlflowClient(res["tracking_uri"]).get_run(res["mlflow_run"])
    assert run.data.params["protocol"] == protocol and "copy.jitter" in run.data.metrics
    arts = [a.path for a in mlflow.MlflowClient(res["tracking_uri"]).list_artifacts(res["mlflow_run"], "report")]
    assert "report/report.html" in arts and "report/videos" in arts


def test_pairs_from_a_video_folder(tmp_path, carphone, single_face_video):
    from expportrait.evaluation.harness import make_pairs
    import shutil
    shutil.copy(carphone, tmp_path / "a.mp4")
    shutil.copy(single_face_video, tmp_path / "b.mp4")
    (tmp_path / "c.jpg").write_bytes(b"")
    assert [(Path(p.source).name, Path(p.driving).name) for p in make_pairs(tmp_path, "self")] == \
        [("a.mp4", "a.mp4"), ("b.mp4", "b.mp4")]
    cross = [(Path(p.source).name, Path(p.driving).name) for p in make_pairs(tmp_path, "cross", 10)]
    assert cross == [("a.mp4", "b.mp4"), ("b.mp4", "a.mp4"), ("c.jpg", "a.mp4")]
    with pytest.raises(ValueError, match="protocol"):
        make_pairs(tmp_path, "both")
