"""Exact-truth shards of the synthetic world: the job's layout, the world's Δf, Δg and β."""
import json

import numpy as np

from preprocessing.synthetic.world import load_clip, load_identity, true_dynamic_offsets
from training.data.shards import ShardDataset, shard_urls


def test_truth_shards_hold_the_worlds_exact_offsets(tiny_corpus, truth_shards):
    world = json.loads((tiny_corpus / "world.json").read_text())
    splits = {i: v["split"] for i, v in world["identities"].items()}
    seen = 0
    for split in ("train", "val", "test"):
        urls = shard_urls(truth_shards, split)
        assert urls, split
        for s in ShardDataset(urls, 2 * len(urls), resampled=False, rank=0, world_size=1, convert=None):
            clip, ident = s.meta["clip_id"], s.meta["identity_id"]
            assert splits[ident] == split and s.meta["offsets_source"] == "synthetic_truth"
            seg = slice(s.meta["frame_start"], s.meta["frame_stop"])
            truth = true_dynamic_offsets(tiny_corpus, clip, ident)[seg]
            assert np.allclose(s.dynamic_offsets.astype(np.float32), truth, atol=2e-6, rtol=2e-3)
            identity = load_identity(tiny_corpus, ident)
            assert np.allclose(s.static_offsets.astype(np.float32), identity.static_offsets, atol=2e-6, rtol=2e-3)
            assert np.array_equal(s.smplx["betas"], identity.betas)
            assert np.array_equal(s.smplx["expression"], load_clip(tiny_corpus, clip)["expression"][seg])
            assert s.silhouette.mean() > 0.05 and s.face_mask.any()          # rendered from the true mesh
            seen += 1
    assert seen == 8                                                        # 4 clips x 2 segments


def test_3dmm_only_normals_leave_out_the_offsets(tiny_corpus, truth_shards, tmp_path):
    """``personalized_normals=False`` (the ablation's shards): normal maps of the 3DMM head alone
    (B, no Δg, no Δf), the same frames and offset fields; the personalized ones differ from them."""
    import torch

    from models.head.head_model import PersonalizedHead
    from models.render.conditions import render_conditions
    from models.transfer.inputs import head_params
    from preprocessing.synthetic.world import clip_camera
    from training.data.truth_shards import write_truth_shards
    write_truth_shards(tiny_corpus, tmp_path, segment_frames=4, clips_per_shard=1, splits=("test",),
                       personalized_normals=False)
    read = lambda root: {s.key: s for s in ShardDataset(shard_urls(root, "test"), 2, resampled=False, rank=0,  # noqa: E731
                                                        world_size=1, convert=None)}
    bare, full = read(tmp_path), read(truth_shards)
    assert bare.keys() == full.keys() and bare
    world = json.loads((tiny_corpus / "world.json").read_text())
    head = PersonalizedHead.from_file(world["model_file"])
    for key, s in bare.items():
        assert s.meta["normals"] == "3dmm_only" and full[key].meta["normals"] == "personalized"
        assert np.array_equal(s.frames, full[key].frames)
        assert np.array_equal(s.dynamic_offsets, full[key].dynamic_offsets)
        seg = slice(s.meta["frame_start"], s.meta["frame_stop"])
        with torch.no_grad():
            verts = head(head_params(s.smplx)).vertices.contiguous()
            cam = clip_camera(load_clip(tiny_corpus, s.meta["clip_id"])).select(seg)
            maps = render_conditions(verts, head.faces, cam, head.face_mask)
        assert np.array_equal(s.normals, maps.normal_rgb().numpy())
        assert not np.array_equal(s.normals, full[key].normals)


def test_fitted_clips_replace_the_truth_as_the_jobs_shards_do(tiny_corpus, truth_shards, tmp_path):
    """``fitted=``: a clip's samples carry the fit's parameters, Δg, Δf (zero without one) and the
    normal maps of the fitted head in the fit's cameras, the clip's own frames; clips without a fit
    are left out (as the job leaves out a clip it could not fit)."""
    import torch

    from models.head.head_model import PersonalizedHead
    from models.render.camera import Camera
    from models.render.conditions import render_conditions
    from models.transfer.inputs import head_params
    from preprocessing.fitted_clip import load_fitted
    from training.data.truth_shards import write_truth_shards
    world = json.loads((tiny_corpus / "world.json").read_text())
    clip_id = next(f"{i}_clip00" for i, v in world["identities"].items() if v["split"] == "test")
    fit = load_fitted(tiny_corpus / "clips" / f"{clip_id}.npz")       # the truth as a FittedClip, then moved
    fit.arrays["expression"] = fit.arrays["expression"] + 0.5
    fit.arrays["camera_t"] = fit.arrays["camera_t"] + np.float32([0.01, 0.0, 0.0])
    fit.static_offsets = np.zeros_like(fit.static_offsets)
    write_truth_shards(tiny_corpus, tmp_path, segment_frames=4, clips_per_shard=1, fitted={clip_id: fit})
    read = lambda root, split: {s.key: s for s in ShardDataset(shard_urls(root, split), 2, resampled=False,  # noqa: E731
                                                               rank=0, world_size=1, convert=None)}
    assert not shard_urls(tmp_path, "train")                               # no fit: left out
    got, truth = read(tmp_path, "test"), read(truth_shards, "test")
    assert got.keys() == truth.keys() and got
    head = PersonalizedHead.from_file(world["model_file"])
    for key, s in got.items():
        assert s.meta["normals"] == "fitted" and s.meta["offsets_source"] == "fitted"
        assert np.array_equal(s.frames, truth[key].frames)
        seg = slice(s.meta["frame_start"], s.meta["frame_stop"])
        assert np.array_equal(s.smplx["expression"], fit.arrays["expression"][seg])
        assert not s.static_offsets.any() and not s.dynamic_offsets.any()
        cam = Camera.from_matrices(fit.arrays["camera_K"][seg], fit.arrays["camera_R"][seg],
                                   fit.arrays["camera_t"][seg], (fit.image_size,) * 2)
        with torch.no_grad():
            maps = render_conditions(head(head_params(s.smplx)).vertices.contiguous(), head.faces, cam, head.face_mask)
        assert np.array_equal(s.normals, maps.normal_rgb().numpy())
        assert not np.array_equal(s.normals, truth[key].normals)
