"""`expportrait transfer` / `expportrait edit` on a small synthetic corpus."""
import json

import av
import numpy as np
import pytest
import torch

from expportrait.cli import main


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, synthetic_model_path):
    from preprocessing.synthetic.world import WorldConfig, generate_corpus
    out = tmp_path_factory.mktemp("corpus")
    generate_corpus(out, WorldConfig(identities=2, clips_per_identity=1, frames=4, size=64), synthetic_model_path,
                    progress=False)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, head):
    from models.transfer import ExpressionTransfer
    from models.transfer.inputs import canonical_face
    torch.manual_seed(0)
    m = ExpressionTransfer(num_face_vertices=head.num_face_vertices)
    m.set_canonical(canonical_face(head))
    out = tmp_path_factory.mktemp("model")
    m.save_pretrained(out)
    return out


def _run(capsys, *args):
    assert main(list(map(str, args))) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_transfer_writes_meshes_and_normal_video(tmp_path, corpus, model_dir, capsys, synthetic_model_path):
    clips = corpus / "clips"
    out = _run(capsys, "transfer", "--driver", clips / "id000_clip00.npz", "--target", clips / "id001_clip00.npz",
               "--model", model_dir, "--out", tmp_path / "t", "--size", 48, "--head-model", synthetic_model_path)
    assert out["frames"] == 4 and out["max_dynamic_offset_mm"] > 0
    with av.open(out["normals_video"]) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 4 and frames[0].shape == (48, 48, 3) and frames[0].max() > 100
    with np.load(out["meshes"]) as z:
        assert z["vertices"].shape[0] == 4 and z["dynamic_offsets"].shape == (4, len(z["face_vertex_ids"]), 3)
        driver = np.load(clips / "id000_clip00.npz")
        assert np.allclose(z["expression"], driver["expression"])           # the driver's expression
        target = np.load(corpus / "identities" / "id001.npz")
        assert np.allclose(z["betas"][0], target["betas"])                  # on the target's shape
    pose_only = _run(capsys, "transfer", "--driver", clips / "id000_clip00.npz", "--target",
                     clips / "id001_clip00.npz", "--mode", "pose", "--out", tmp_path / "p", "--size", 32,
                     "--head-model", synthetic_model_path)
    with np.load(pose_only["meshes"]) as z:
        tgt = np.load(clips / "id001_clip00.npz")
        assert np.allclose(z["expression"], tgt["expression"][0])            # the target's own expression
        assert np.abs(z["dynamic_offsets"]).max() == 0                         # no model: Δf = 0


def test_edit_scales_regions_and_exports_ply(tmp_path, corpus, model_dir, capsys, synthetic_model_path):
    clip = corpus / "clips" / "id000_clip00.npz"
    plain = _run(capsys, "edit", "--clip", clip, "--model", model_dir, "--out", tmp_path / "a", "--size", 32,
                 "--head-model", synthetic_model_path)
    edited = _run(capsys, "edit", "--clip", clip, "--model", model_dir, "--out", tmp_path / "b", "--size", 32,
                  "--mouth", 0, "--jaw", 0.5, "--mesh", "ply", "--head-model", synthetic_model_path)
    assert len(list((tmp_path / "b" / "meshes").glob("frame_*.ply"))) == 4
    with np.load(plain["meshes"]) as z:
        src = np.load(clip)
        assert np.allclose(z["jaw_pose"], src["jaw_pose"], atol=1e-6)        # unedited: the clip itself
        assert np.allclose(z["head_pose"], src["head_pose"], atol=1e-5)
    import trimesh
    with np.load(plain["meshes"]) as z:
        plain_vertices = z["vertices"]
    edited_vertices = np.stack([trimesh.load(tmp_path / "b" / "meshes" / f"frame_{i:05d}.ply", process=False).vertices
                                for i in range(4)])
    moved = np.linalg.norm(edited_vertices - plain_vertices, axis=-1).max(0)     # per vertex, metres
    assert moved.max() > 1e-3                                                  # the mouth closed
    crown = plain_vertices[0, :, 1] > np.quantile(plain_vertices[0, :, 1], 0.95)  # top of the head
    assert moved[crown].max() < 1e-4                                           # far from the edit: still
    assert edited["edit"]["mouth"] == 0.0 and edited["edit"]["jaw"] == 0.5


def test_bad_model_is_a_clear_error(tmp_path, corpus, capsys):
    rc = main(["transfer", "--driver", str(corpus / "clips" / "id000_clip00.npz"), "--target",
               str(tmp_path / "missing.npz"), "--out", str(tmp_path / "x")])
    assert rc == 2
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"] == "FileNotFoundError"
