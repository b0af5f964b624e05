"""`expportrait reenact`: windows without seams, single runs, and the Ray batch with a failed row."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
import torch
from processes import run_group

from expportrait.cli import main
from expportrait.reenactment import generate_windows, window_starts

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import tiny_corpus, tiny_package  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")   # restored after the module


@pytest.fixture(scope="module")
def package(tmp_path_factory, head):
    return tiny_package(tmp_path_factory.mktemp("reenactpkg"), head, size=64, window=9, overlap=4, frame_stride=1,
                        steps=2, shift=5.0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, synthetic_model_path):
    return tiny_corpus(tmp_path_factory.mktemp("reenactcorpus"), synthetic_model_path, frames=21, identities=2)


def _frames(path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_window_starts_cover_every_frame_and_end_aligned():
    assert window_starts(5, 9, 4) == [0]
    assert window_starts(9, 9, 4) == [0]
    assert window_starts(21, 9, 4) == [0, 5, 10, 12]
    for t in (10, 17, 33, 50):
        s = window_starts(t, 9, 3)
        assert s[0] == 0 and s[-1] + 9 == t and all(b - a <= 6 for a, b in zip(s, s[1:]))


def test_cross_fade_spreads_a_disagreement_over_the_overlap():
    """Windows that disagree by a constant: the blend moves between them in overlap+1 equal steps
    (a hard cut would jump by the whole difference in one frame)."""
    value = {0: 0.0, 5: 100.0, 10: 40.0, 12: 40.0}
    out = generate_windows(lambda s: np.full((9, 2, 2, 3), value[s]), 21, 9, 4)[:, 0, 0, 0]
    steps = np.abs(np.diff(out))
    assert out[0] == 0 and out[-1] == 40 and steps.max() <= 100 / 5 + 1e-9


@pytest.mark.slow
def test_long_video_windows_join_without_a_seam(package, corpus):
    """The tiny (untrained) generator on a 21-frame driver, windows of 9 (the reference + 8 driven
    frames) overlapping by 4: the frame difference across each join is no larger than the
    largest inside a window."""
    from expportrait.reenactment import Reenactor
    r = Reenactor.from_package(package)
    clips = corpus / "clips"
    src, drv = r.subject(clips / "id000_clip00.npz", 1), r.subject(clips / "id001_clip00.npz")
    normals, ref_normal = r.driving_normals(src, drv)
    raw = {}
    import expportrait.reenactment as reen
    original = reen.generate_windows

    def spy(fn, t, window, overlap):
        return original(lambda s: raw.setdefault(s, fn(s)), t, window, overlap)

    reen.generate_windows = spy
    try:
        frames, starts = r.generate(src.frames[0], ref_normal, normals)
    finally:
        reen.generate_windows = original
    assert starts == [0, 4, 8, 12, 13] and frames.shape == (21, 64, 64, 3)
    diff = lambda a, b: float(np.abs(a.astype(float) - b.astype(float)).mean())
    inside = max(diff(w[i], w[i + 1]) for w in raw.values() for i in range(len(w) - 1))
    joins = []
    for prev, s in zip(starts, starts[1:]):
        joins += [(s - 1, s), (prev + 7, prev + 8)]          # where a window enters and where one leaves
    across = max(diff(frames[a], frames[b]) for a, b in joins if b < len(frames))
    assert across <= inside, (across, inside)
    assert diff(frames[0], frames[-1]) < 3 * inside           # anchored to the reference: no runaway drift


@pytest.mark.slow
def test_reenact_command_writes_video_and_side_by_side(package, corpus, tmp_path, capsys):
    clips = corpus / "clips"
    rc = main(["reenact", "--model", str(package), "--source", str(clips / "id000_clip00.npz"), "--driving",
               str(clips / "id001_clip00.npz"), "--out", str(tmp_path / "o.mp4"), "--side-by-side",
               "--max-frames", "12"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0, res
    assert res["frames"] == 12 and len(_frames(tmp_path / "o.mp4")) == 12
    assert _frames(res["side_by_side"])[0].shape == (64, 4 * 64, 3)
    rc = main(["reenact", "--model", str(package), "--source", str(tmp_path / "missing.png"), "--driving",
               str(clips / "id001_clip00.npz"), "--out", str(tmp_path / "x.mp4")])
    err = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 2 and err["status"] == "file_not_found" and "missing.png" in err["message"]
    rc = main(["reenact", "--model", str(package), "--source", str(clips / "id000_clip00.npz"), "--driving",
               str(clips / "id001_clip00.npz"), "--out", str(tmp_path / "p.mp4"), "--paste-back", "--max-frames", "4"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0, res          # corpus clips are tracked and cropped too: their crops paste back
    assert _frames(tmp_path / "p.mp4")[0].shape == (64, 64, 3)     # the source's full frame size


@pytest.mark.extended
@pytest.mark.slow
def test_ray_batch_finishes_with_a_failed_row_for_an_unreadable_driver(package, corpus, tmp_path):
    clips = corpus / "clips"
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    pairs = pd.DataFrame({"source": [clips / "id000_clip00.npz", clips / "id001_clip00.npz",
                                     clips / "id000_clip00.npz"],
                          "driving": [clips / "id001_clip00.npz", bad, clips / "id000_clip00.npz"]}).astype(str)
    pairs.to_csv(tmp_path / "pairs.csv", index=False)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    proc = run_group([sys.executable, "-m", "expportrait.cli", "reenact", "--model", str(package), "--pairs",
                      str(tmp_path / "pairs.csv"), "--out-dir", str(tmp_path / "batch"), "--workers", "2",
                      "--max-frames", "9"], env=env, timeout=900)      # its Ray is stopped by process group
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res == {**res, "pairs": 3, "ok": 2, "failed": 1}
    m = pd.read_parquet(tmp_path / "batch" / "manifest.parquet")
    assert list(m["status"]) == ["ok", "failed", "ok"]
    assert "broken.mp4" in m.loc[1, "message"] and "SubjectError[" in m.loc[1, "message"]
    for out in m.loc[m["status"] == "ok", "out"]:
        assert len(_frames(out)) == 9
    assert not Path(m.loc[1, "out"]).exists()


def test_model_from_a_folder_of_exports(package):
    """--model may be a run's export folder (no package.json): its parts are found by content."""
    from expportrait.registry import load_reenactor
    exports = package.parent / "export"
    r, desc = load_reenactor(str(exports))
    assert set(desc["parts"]) == {"generator", "codec", "transfer"} and r.transfer is not None
    with pytest.raises(FileNotFoundError, match="no codec export"):
        load_reenactor(str(exports / "generator"))
    r2, desc2 = load_reenactor(str(exports / "generator"), parts={"codec": str(exports / "codec")})
    assert desc2["parts"]["codec"] == str(exports / "codec") and r2.transfer is None


@pytest.fixture(scope="module")
def stages(synthetic_model_path):
    """The job's stages with a short fit, rebuilt from their stage spec as a package's are."""
    from preprocessing.clip_records import StageConfig
    from preprocessing.clip_stages import StageContext, stage_spec
    config = StageConfig(min_frames=4, max_frames=8, segment_frames=8, crop_size=64,
                         fit={"iters_rigid": 10, "iters_expression": 10})
    spec = json.loads(json.dumps(stage_spec(config, synthetic_model_path, fit_threads=1)))
    ctx = StageContext.from_spec(spec, synthetic_model_path, 1)
    assert ctx.fit_threads == 1 and ctx.config == config         # fits with the job's workers' threads
    return ctx


def test_driver_loaded_at_the_generators_frame_stride(corpus, stages):
    from expportrait.reenactment import load_subject
    clip = corpus / "clips" / "id001_clip00.npz"
    full, strided = load_subject(clip, stages), load_subject(clip, stages, max_frames=20, stride=3)
    assert len(full.frames) == 21 and len(strided.frames) == 7 and strided.fps == pytest.approx(full.fps / 3)
    assert np.array_equal(strided.full_frames, full.full_frames[:20:3])
    # framed as training samples: the tracker's aligned crops at the stage spec's crop size,
    # the exact cameras moved into them
    assert strided.frames.shape[1:] == (64, 64, 3) and strided.clip.image_size == 64
    assert strided.boxes.shape == (7, 3)
    assert np.array_equal(strided.clip.arrays["expression"], full.clip.arrays["expression"][:20:3])


def test_inference_subject_is_the_jobs_sample(corpus, stages, tmp_path):
    """A raw video through inference's subject path and through the job's own clip stage
    (``run_clip``, what its workers run) gives the same crops, parameters, cameras and normal
    maps, at the stage spec's frame rate (the source's 30 fps is resampled to 25, not kept)."""
    from expportrait.reenactment import load_subject
    from models.render.camera import Camera
    from models.transfer.inputs import head_params, render_normal_maps
    from preprocessing.clip_records import ClipItem
    from preprocessing.clip_stages import run_clip
    from preprocessing.sample_schema import decode_sample
    from preprocessing.video import write_video
    frames = _frames(corpus / "clips" / "id000_clip00.mp4")
    video = write_video(tmp_path / "subject.mp4", np.stack(frames), 30.0)
    out = run_clip(ClipItem("subject", str(video), "id"), stages)
    assert out.ok, out.reason
    sample = decode_sample({"__key__": "k", **out.samples[0]})
    subject = load_subject(video, stages, max_frames=8)
    assert subject.fps == sample.meta["fps"] == 25.0
    assert np.array_equal(subject.frames, sample.frames)
    for k, v in subject.clip.arrays.items():
        np.testing.assert_allclose(v, sample.smplx[k], atol=1e-5, rtol=0, err_msg=k)
    a = subject.clip.arrays
    cam = Camera.from_matrices(a["camera_K"], a["camera_R"], a["camera_t"], (64, 64))
    normals = render_normal_maps(stages.head, head_params({**a, "betas": subject.clip.betas}),
                                 torch.as_tensor(subject.clip.static_offsets),
                                 torch.as_tensor(subject.clip.dynamic_offsets), cam).numpy()
    assert (normals != sample.normals).any(-1).mean() < 1e-3


def test_a_fit_seen_in_its_whole_frame_lines_up_with_the_frame(corpus, stages):
    """A raw frame fitted by the job's stages (as reenact fits a source image) and moved out of its
    crop (in_full_frame, at a smaller side as the generator sees it): the fitted head's silhouette
    covers the true head's in the whole frame."""
    from expportrait.reenactment import fitted_subject, in_full_frame
    from models.generator.frames import generator_normal_maps
    from models.render.conditions import render_conditions
    from models.transfer.inputs import head_params
    from preprocessing.synthetic.world import SyntheticWorld, clip_camera, load_clip, load_identity
    from preprocessing.synthetic.motion import ClipMotion
    frames = np.stack(_frames(corpus / "clips" / "id000_clip00.mp4"))[:1]
    subject = fitted_subject(frames, stages, "frame0")
    whole = in_full_frame(subject, 32)
    assert whole.clip.image_size == 32 and whole.frames.shape == frames.shape and (whole.boxes[:, 2] == 64).all()
    assert np.array_equal(whole.clip.arrays["expression"], subject.clip.arrays["expression"])
    a = whole.clip.arrays
    from models.render.camera import Camera
    cam = Camera.from_matrices(a["camera_K"], a["camera_R"], a["camera_t"], (32, 32))
    fitted = generator_normal_maps(stages.head, head_params({**a, "betas": whole.clip.betas}), None, None, cam, 32)
    world = SyntheticWorld(stages.model_path)
    clip = load_clip(corpus, "id000_clip00")
    params, static, dynamic, _ = world.head_inputs(load_identity(corpus, "id000"), ClipMotion.from_arrays(clip))
    with torch.no_grad():
        verts = world.head(params.map(lambda x: x[:1]), static, dynamic[:1]).vertices.contiguous()
        truth = render_conditions(verts, world.head.faces, clip_camera(clip).select(slice(0, 1)).resized(32))
    head_fit, head_true = (fitted[0] > 0).any(-1).numpy(), truth.silhouette[0].numpy() > 0
    iou = (head_fit & head_true).sum() / (head_fit | head_true).sum()
    assert iou > 0.8, iou
