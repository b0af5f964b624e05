"""The evaluation report in headless Chromium: a report written by ``write_report`` with videos
written by ``write_video`` (the real writer the harness uses) plays in the browser, a broken video
is reported with the browser's error, and ``expportrait report-shot`` saves a screenshot.
Skipped when no Chromium is installed (``apt-get install chromium`` or ``$CHROMIUM``)."""
from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest
from PIL import Image

from expportrait.cli import main
from expportrait.evaluation.browser import ChromiumNotFound, check_report, find_chromium, serve
from expportrait.evaluation.harness import PairResult
from expportrait.evaluation.report import write_report
from preprocessing.video import write_video

try:
    find_chromium()
    HAVE_CHROMIUM = True
except ChromiumNotFound:
    HAVE_CHROMIUM = False
needs_chromium = pytest.mark.skipif(not HAVE_CHROMIUM, reason="no Chromium on this machine (apt-get install "
                                    "chromium, or set $CHROMIUM): the report's videos cannot be checked in a browser")


def _frames(n: int = 8, h: int = 33, w: int = 65, seed: int = 0) -> np.ndarray:
    """Moving coloured bars, odd-sized on purpose (the writer pads to even sizes)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (1, 1, w, 3), dtype=np.uint8)
    frames = np.repeat(np.repeat(base, h, 1), n, 0).copy()
    for t in range(n):
        frames[t, :, (4 * t) % w] = 255
    return frames


def _report(tmp_path, broken: bool = False, pix_fmt: str = "yuv420p"):
    out = tmp_path / "eval"
    results, metrics = [], {"psnr": 20.0, "ssim": 0.5, "l1": 0.1}
    for i in range(2):
        video = write_video(out / "videos" / f"pair{i}.mp4", _frames(seed=i), 25.0, pix_fmt=pix_fmt)
        results.append(PairResult(f"pair{i}", "src.png", "drv.mp4", model=dict(metrics), copy=dict(metrics),
                                  curves={"model": {"psnr": [20.0, 21.0], "csim_sface": [0.9, 0.8]}}, video=str(video)))
    if broken:
        bad = out / "videos" / "broken.mp4"
        bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
        results.append(PairResult("broken", "src.png", "drv.mp4", model=dict(metrics), copy=dict(metrics),
                                  video=str(bad)))
    summary = {"model": metrics, "copy": metrics, "pairs": len(results), "pairs_ok": len(results)}
    return write_report(results, summary, out, {"protocol": "self"})


def test_server_answers_byte_ranges(tmp_path):
    (tmp_path / "a.bin").write_bytes(bytes(range(100)))
    with serve(tmp_path) as base:
        req = urllib.request.Request(base + "a.bin", headers={"Range": "bytes=10-19"})
        with urllib.request.urlopen(req) as r:
            assert r.status == 206 and r.headers["Content-Range"] == "bytes 10-19/100"
            assert r.read() == bytes(range(10, 20))
        with urllib.request.urlopen(base + "a.bin") as r:
            assert r.status == 200 and r.read() == bytes(range(100))


def test_missing_chromium_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CHROMIUM", str(tmp_path / "no-such-chromium"))
    with pytest.raises(ChromiumNotFound, match="no-such-chromium"):
        find_chromium()


@needs_chromium
def test_report_videos_play_in_chromium_and_screenshot(tmp_path):
    report = _report(tmp_path)
    shot = tmp_path / "shot.png"
    check = check_report(report, shot, video_timeout=30)
    assert len(check.videos) == 2 and check.failed == [], check.as_dict()
    # the writer pads 65x33 to 66x34; Chromium decoded frames of that size
    assert {(v.width, v.height) for v in check.videos} == {(66, 34)}
    assert all(v.duration and v.duration > 0.2 for v in check.videos)
    image = Image.open(shot)
    assert image.format == "PNG" and image.width == 1280 and image.height > 900   # the whole page


@needs_chromium
def test_broken_video_is_reported_with_the_browsers_error(tmp_path, capsys):
    report = _report(tmp_path, broken=True)
    rc = main(["report-shot", str(report), "--out", str(tmp_path / "shot.png"), "--max-height", "600"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 2 and line["error"] == "ValueError", line
    assert "1 of 3 videos did not play" in line["message"] and "videos/broken.mp4" in line["message"]
    assert "MediaError" in line["message"] and line["videos_loaded"] == 2
    assert Image.open(tmp_path / "shot.png").height == 600


@needs_chromium
def test_report_shot_command(tmp_path, capsys):
    report = _report(tmp_path)
    rc = main(["report-shot", str(report), "--viewport-only", "--height", "700"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and line["videos"] == 2 and line["videos_loaded"] == 2, line
    assert Image.open(line["screenshot"]).size == (1280, 700)
