"""The expression transfer module: shapes, face region, zero at neutral, overfitting, flavors,
save/load."""
import pytest
import torch

from models.head.head_model import HeadParams
from models.head.offsets import smooth_random_field
from models.transfer import FLAVORS, ExpressionTransfer
from models.transfer.inputs import canonical_face, neutral_inputs


@pytest.fixture(scope="module")
def module(head):
    torch.manual_seed(0)
    m = ExpressionTransfer(num_face_vertices=head.num_face_vertices, flavor="tiny_cpu")
    m.set_canonical(canonical_face(head))
    return m


def _targets(head, batch=2, frames=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    betas = torch.randn(batch, 300, generator=g) * 0.5
    static = torch.randn(batch, head.num_vertices, 3, generator=g) * 1e-3
    neutral, static_face = neutral_inputs(head, betas, static)
    expr = torch.randn(batch, frames, 100, generator=g)
    jaw = torch.randn(batch, frames, 3, generator=g) * 0.1
    return expr, jaw, neutral, static_face


def test_shapes_face_region_and_zero_at_neutral(head, module):
    expr, jaw, neutral, static = _targets(head)
    out = module(expr, jaw, neutral, static)
    assert out.shape == (2, 3, head.num_face_vertices, 3)
    ids = torch.tensor([5, 0, 17, head.num_face_vertices - 1])
    sub = module(expr, jaw, neutral, static, ids)
    assert sub.shape == (2, 3, 4, 3)
    assert torch.allclose(sub, out[:, :, ids], atol=1e-9)            # per-vertex MLP: subsets agree
    zero = module(torch.zeros(1, 2, 100), torch.zeros(1, 2, 3), neutral[:1], static[:1])
    assert zero.abs().max() < 1e-9                                      # Δf = 0 at a neutral face
    # Δf lives on the face region: the posed head moves there and nowhere else
    params = HeadParams.zeros(3)
    params.expression, params.jaw_pose = expr[0], jaw[0]
    with torch.no_grad():
        base = head(params).vertices
        moved = head(params, dynamic_offsets=out[0].detach()).vertices
    changed = (moved - base).norm(dim=-1).amax(0) > 0
    assert changed.any()
    assert not changed[~head.face_mask].any()
    assert changed[head.face_mask].float().mean() > 0.9


def test_temporal_window_sees_neighbours_only_when_asked(head):
    canon = canonical_face(head)
    expr = torch.zeros(1, 9, 100)
    expr2 = expr.clone()
    expr2[0, 8, 0] = 2.0                                   # change the last frame only
    args = (torch.zeros(1, 9, 3), canon[None], torch.zeros(1, head.num_face_vertices, 3))
    for flavor, window in (("tiny_cpu", 0), ("base", 2)):
        torch.manual_seed(0)
        m = ExpressionTransfer(num_face_vertices=head.num_face_vertices, flavor=flavor)
        m.set_canonical(canon)
        if window:
            torch.nn.init.normal_(m.encoder.temporal.weight, std=0.1)
        with torch.no_grad():
            d = (m(expr2, *args, vertex_ids=torch.arange(64)) - m(expr, *args, vertex_ids=torch.arange(64)))
        moved = d.abs().amax((0, 2, 3)) > 0
        assert moved[8]
        assert moved[:8].tolist() == [False] * (8 - window) + [True] * window


def test_overfits_a_tiny_batch(head_coarse):
    """Targets with the synthetic world's structure: per-frame weights of a few detail
    fields whose depth depends on the identity's Δg. Small on purpose (the coarse head, one
    thread, 512 vertices, 60 steps): it checks that the module can fit, not how fast."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        head = head_coarse
        torch.manual_seed(0)
        m = ExpressionTransfer(num_face_vertices=head.num_face_vertices, flavor="tiny_cpu")
        canon = canonical_face(head)
        m.set_canonical(canon)
        expr, jaw, neutral, static = _targets(head, batch=2, frames=6, seed=1)
        g = torch.Generator().manual_seed(2)
        fields = torch.stack([smooth_random_field(canon, g, 1e-3) for _ in range(3)])      # (3, N, 3)
        coeff = torch.relu(expr[..., :3])                                                   # (B, T, 3)
        depth = torch.tensor([0.5, 1.5])[:, None, None, None]
        target = depth * torch.einsum("btc,cnk->btnk", coeff, fields)
        ids = torch.randperm(head.num_face_vertices, generator=g)[:512]
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)

        def loss():
            pred = m(expr, jaw, neutral, static, ids)
            return ((pred - target[:, :, ids]) * 1000).square().mean()

        first = loss().item()
        for _ in range(60):
            opt.zero_grad()
            value = loss()
            value.backward()
            opt.step()
        assert value.item() < 0.01 * first, (first, value.item())
    finally:
        torch.set_num_threads(threads)


def test_flavors_grow_and_unknown_is_refused():
    sizes = [sum(p.numel() for p in ExpressionTransfer(100, flavor=f).parameters())
             for f in ("tiny_cpu", "small", "base", "paper")]
    assert list(FLAVORS) == ["tiny_cpu", "small", "base", "paper"]
    assert sizes == sorted(sizes) and sizes[0] < 50_000 < 500_000 < sizes[-1]
    with pytest.raises(ValueError, match="tiny_cpu"):
        ExpressionTransfer(100, flavor="huge")


def test_save_pretrained_round_trip(tmp_path, head, module):
    module.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "m" / "config.json").is_file()
    loaded = ExpressionTransfer.from_pretrained(tmp_path / "m")
    expr, jaw, neutral, static = _targets(head, seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(expr, jaw, neutral, static), module(expr, jaw, neutral, static))
    assert torch.equal(loaded.canonical_vertices, module.canonical_vertices)
