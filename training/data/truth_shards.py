"""Shards of the synthetic world's exact truth, in the preprocessing job's schema and layout.

The transfer benchmark trains on two sources side by side: the offsets the preprocessing job
fitted, and these exact ones, so the data's quality and the model's are seen apart. Each clip
of a corpus becomes schema samples (``segment_frames`` frames each) with the true β, ψ, jaw,
pose, camera, Δg and Δf, the clip's decoded frames and the true mesh's condition maps; shards
are cut and written by the job's own ``plan_shards`` / ``write_shard`` (same names, done
markers and manifest rows), so ``ShardDataModule`` reads them unchanged.

One difference from fitted shards: Δf here is the world's own (zero at a neutral face), not
re-centred over the clip (the training loss compares frame-centred Δf, so either trains the
same; meta ``offsets_source`` says ``synthetic_truth``).

With ``fitted=`` (clip id -> a fit of it in its whole frames), those clips carry the fitter's
parameters and normal maps on the clip's frames, as the job's shards do: the generator benchmark's
``--train-normals fitted``.

    python -m training.data.truth_shards --corpus CORPUS --out OUT [--segment-frames 24] [--3dmm-normals]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def _decode(path: Path) -> np.ndarray:
    import av
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def truth_samples(corpus: Path, row, head, segment_frames: int, personalized_normals: bool = True,
                  fitted=None) -> list:
    """Schema samples (not yet encoded) of one manifest row's clip; ``personalized_normals``:
    condition maps of the personalized head (B + Δg + Δf), else of the 3DMM head alone (Δg = Δf
    = 0: the paper's ablation; the samples' offset fields keep the truth). ``fitted``: a
    :class:`preprocessing.fitted_clip.FittedClip` of this clip seen in its whole frames (one per
    frame, ``image_size`` the corpus's): its parameters, Δg, Δf and cameras replace the truth's,
    condition maps included, as the preprocessing job's shards carry the fitter's (meta
    ``offsets_source``/``normals``: ``fitted``); the frames stay the clip's."""
    from models.render.conditions import render_conditions
    from models.transfer.inputs import head_params
    from preprocessing.clip_stages import segments
    from preprocessing.sample_schema import ShardSample, sample_key
    from preprocessing.synthetic.world import clip_camera, load_clip, load_identity, true_dynamic_offsets

    clip = load_clip(corpus, row.clip_id)
    ident = load_identity(corpus, row.identity_id)
    frames = _decode(corpus / row.video)
    t = min(len(frames), len(clip["expression"]))
    smplx = {k: np.asarray(clip[k], np.float32)[:t] for k in
             ("expression", "global_orient", "neck_pose", "head_pose", "jaw_pose", "leye_pose",
              "reye_pose", "transl", "camera_K", "camera_R", "camera_t")}
    smplx["betas"] = ident.betas.astype(np.float32)
    dynamic = true_dynamic_offsets(corpus, row.clip_id, row.identity_id)[:t].astype(np.float32)
    static = ident.static_offsets.astype(np.float32)
    cam = clip_camera(clip)
    source = "synthetic_truth"
    if fitted is not None:
        from models.render.camera import Camera
        if fitted.num_frames < t or fitted.image_size != frames.shape[1]:
            raise ValueError(f"{row.clip_id}: the fit has {fitted.num_frames} frames at {fitted.image_size}², the "
                             f"clip {t} at {frames.shape[1]}² (fit it in its whole frames: in_full_frame)")
        smplx = {k: np.asarray(fitted.arrays[k], np.float32)[:t] for k in smplx if k != "betas"}
        smplx["betas"] = np.asarray(fitted.betas, np.float32)
        static = np.asarray(fitted.static_offsets, np.float32)
        dynamic = (np.zeros_like(dynamic) if fitted.dynamic_offsets is None
                   else np.asarray(fitted.dynamic_offsets, np.float32)[:t])
        cam = Camera.from_matrices(smplx["camera_K"], smplx["camera_R"], smplx["camera_t"], (fitted.image_size,) * 2)
        source = "fitted"
    face_ids = head.face_vertex_ids.numpy().astype(np.int32)
    samples = []
    for k, seg in enumerate(segments(t, segment_frames)):
        params = head_params(smplx, seg)
        with torch.no_grad():
            offsets = (torch.as_tensor(static), torch.as_tensor(dynamic[seg])) if personalized_normals else (None, None)
            verts = head(params, *offsets).vertices.contiguous()
            maps = render_conditions(verts, head.faces, cam.select(seg), head.face_mask)
        sil = maps.silhouette.numpy() > 0
        n = seg.stop - seg.start
        samples.append(ShardSample(
            key=sample_key(row.clip_id, k), frames=np.ascontiguousarray(frames[seg]),
            normals=maps.normal_rgb().numpy(), silhouette=sil, face_mask=(maps.face_mask.numpy() > 0) & sil,
            depth=(maps.depth.numpy() * sil).astype(np.float16),
            smplx={kk: (v if kk == "betas" else v[seg]) for kk, v in smplx.items()},
            dynamic_offsets=dynamic[seg].astype(np.float16), face_vertex_ids=face_ids,
            static_offsets=static.astype(np.float16),
            qc={"status": ["ok"] * n}, meta={
                "clip_id": row.clip_id, "identity_id": row.identity_id, "split": row.split,
                "segment": k, "frame_start": seg.start, "frame_stop": seg.stop, "fps": float(row.fps),
                "offsets_source": source, "crop_size": int(frames.shape[1]),
                "normals": "fitted" if fitted is not None else "personalized" if personalized_normals
                else "3dmm_only"}))
    return samples


def write_truth_shards(corpus: str | Path, out: str | Path, segment_frames: int = 24,
                       clips_per_shard: int = 4, splits: tuple[str, ...] | None = None,
                       frame_codec: str = "lossless", personalized_normals: bool = True,
                       fitted: dict | None = None) -> dict:
    """Write ``OUT/shards/<split>-<k>.tar`` (+ done markers) of a corpus's exact truth
    (``personalized_normals``: see :func:`truth_samples`; ``fitted``: clip id -> its FittedClip,
    whose samples carry the fit instead, :func:`truth_samples`; clips without one are left out,
    as the job leaves out a clip it could not fit)."""
    import pandas as pd

    from models.head.head_model import PersonalizedHead
    from preprocessing.shard_format import ShardFolder, plan_shards, write_shard
    from preprocessing.clip_records import ClipItem, ClipOutcome
    from preprocessing.sample_schema import encode_sample

    corpus, out = Path(corpus), Path(out)
    world = json.loads((corpus / "world.json").read_text())
    head = PersonalizedHead.from_file(world["model_file"], subdivision_levels=world["config"]["subdivision"])
    manifest = pd.read_parquet(corpus / "manifest.parquet")
    if splits is not None:
        manifest = manifest[manifest.split.isin(splits)]
    if fitted is not None:
        manifest = manifest[manifest.clip_id.isin(list(fitted))]
    rows = {r.clip_id: r for r in manifest.itertuples()}
    items = [ClipItem(r.clip_id, str(corpus / r.video), r.identity_id, r.split) for r in rows.values()]
    output = ShardFolder(out)
    output.prepare()
    counts = {"clips": 0, "samples": 0, "shards": 0}
    for spec in plan_shards(items, clips_per_shard, "synthetic_truth"):
        outcomes = []
        for item in spec.clips:
            samples = truth_samples(corpus, rows[item.clip_id], head, segment_frames, personalized_normals,
                                    (fitted or {}).get(item.clip_id))
            outcomes.append(ClipOutcome(item.clip_id, item.identity_id, item.split, item.path, "ok",
                                        frames=sum(s.num_frames for s in samples),
                                        samples=[encode_sample(s, frame_codec, fps=float(rows[item.clip_id].fps))
                                                 for s in samples]))
            counts["clips"] += 1
            counts["samples"] += len(samples)
        write_shard(output, spec, outcomes)
        counts["shards"] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--segment-frames", type=int, default=24)
    p.add_argument("--clips-per-shard", type=int, default=4)
    p.add_argument("--3dmm-normals", dest="personalized_normals", action="store_false",
                   help="condition maps of the 3DMM head alone (Δg = Δf = 0), not the personalized head")
    args = p.parse_args(argv)
    print(json.dumps(write_truth_shards(args.corpus, args.out, args.segment_frames, args.clips_per_shard,
                                        personalized_normals=args.personalized_normals)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
