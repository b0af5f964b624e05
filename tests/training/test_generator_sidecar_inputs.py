"""The generator step on precomputed tensors only: sidecar latents and sidecar driving normals,
no RGB frames in the batch (``fields: []``), no codec and no rendering in the step."""
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sidecar_batch(b: int = 2, frames: int = 9, size: int = 32) -> dict:
    g = torch.Generator().manual_seed(0)
    t = (frames - 1) // 4 + 1
    return {"key": [f"k{i}" for i in range(b)],
            "latents": torch.randn(b, 16, t, size // 8, size // 8, generator=g).half(),
            "reference_latent": torch.randn(b, 16, t, size // 8, size // 8, generator=g).half(),
            "driving_normals": torch.randint(0, 256, (b, frames, size, size, 3), generator=g, dtype=torch.uint8)}


def test_a_step_reads_only_precomputed_tensors():
    from models.generator.frames import unit
    from training.tasks.generator import GeneratorTask
    torch.manual_seed(0)
    task = GeneratorTask(frames=5, frame_stride=1, random_start=False, transfer_module="/nonexistent/transfer",
                         p_random_reference=0.0)         # as the wan configs train on sidecars
    batch = _sidecar_batch()
    x = task.inputs(batch, torch.Generator().manual_seed(0), training=True)
    assert "video" not in x and task._frozen["codec"] is None and task._frozen["transfer"] is None
    assert torch.equal(x["latents"], batch["latents"][:, :, :2].float())
    assert torch.equal(x["normals"], unit(batch["driving_normals"][:, :5]))
    assert task.frames_read == 5                    # the reader decodes no more than the window
    loss = task.training_step(batch, 0)
    assert torch.isfinite(loss) and task._frozen["codec"] is None and task._frozen["transfer"] is None


def test_without_frames_a_window_the_sidecar_does_not_hold_is_refused():
    from training.tasks.generator import GeneratorTask
    task = GeneratorTask(frames=5, frame_stride=2, random_start=False, p_random_reference=0.0)   # stride 2
    with pytest.raises(ValueError, match="no frames and no sidecar latents"):
        task.inputs(_sidecar_batch(), None, training=True)
    # references from other frames need the frames: refused by name, not trained on something else
    moving = GeneratorTask(frames=5, frame_stride=1, random_start=False, p_random_reference=0.5)
    with pytest.raises(ValueError, match="p_random_reference=0.5 .* no decoded frames"):
        moving.inputs(_sidecar_batch(), torch.Generator().manual_seed(0), training=True)
