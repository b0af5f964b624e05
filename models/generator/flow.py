"""Flow matching for the generator, as the public Wan trainers do it (pure functions + a sampler).

    x_t = (1 − σ) x0 + σ ε,    target v = ε − x0,    timestep = 1000 σ

σ is drawn uniformly and shifted, σ' = sσ / (1 + (s − 1)σ) with s ≈ 5 (Wan's sampling shift),
or logit-normal. Noise, σ and the target are built in fp32 whatever dtype the batch arrives in
(a bf16 precision plugin casts the batch); the loss is computed in fp32.

Condition dropout: each sample independently loses its driving normals, its reference normal
and its reference image with probability p (their encoder outputs are zeroed), which trains the
unconditional branch that classifier-free guidance over the condition needs at sampling:
    v = v(no normals) + g · (v(all) − v(no normals)).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor


def shift_sigma(sigma: Tensor, shift: float) -> Tensor:
    """Wan / SD3 time shift: more weight on high noise for s > 1."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigmas(batch: int, kind: str = "shifted", shift: float = 5.0, mean: float = 0.0, std: float = 1.0,
                  generator: torch.Generator | None = None, device=None) -> Tensor:
    """σ ∈ (0, 1), fp32, shape (B,): ``shifted`` uniform or ``logit_normal`` (SD3), both then
    time-shifted by ``shift`` (1: unshifted). A sampler that runs few steps at a high shift
    evaluates the model only at high σ: train with a matching shift."""
    if kind == "shifted":
        u = torch.rand(batch, generator=generator, device=device, dtype=torch.float32)
        return shift_sigma(u, shift)
    if kind == "logit_normal":
        return shift_sigma(torch.sigmoid(mean + std * torch.randn(batch, generator=generator, device=device,
                                                                  dtype=torch.float32)), shift)
    raise ValueError(f"unknown sigma sampling {kind!r}; known: 'shifted', 'logit_normal'")


def noisy_and_target(x0: Tensor, sigma: Tensor, noise: Tensor | None = None,
                     generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(x_t, v) in fp32 for clean latents x0 (B, ...) and σ (B,)."""
    x0 = x0.float()
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
    s = sigma.float().view(-1, *([1] * (x0.ndim - 1)))
    return (1 - s) * x0 + s * noise.float(), noise.float() - x0


def residual_base(model: object, conditions: dict) -> Tensor | None:
    """What the flow runs relative to: the reference latent's frame 0 in every latent frame when
    the model's flavor has ``reference_residual`` (x0 = latents − base), else None."""
    f = getattr(model, "flavor", None)
    if f is None or not getattr(f, "reference_residual", False):
        return None
    ref = conditions["reference_latent"].float()
    return ref[:, :, :1].expand_as(ref)


def timestep_of(sigma: Tensor) -> Tensor:
    return 1000.0 * sigma.float()


def condition_keep(batch: int, p_driving: float = 0.05, p_reference: float = 0.05, p_reference_normal: float = 0.05,
                   generator: torch.Generator | None = None, device=None) -> dict[str, Tensor]:
    """Per-sample 0/1 keep masks for condition dropout (the model's ``keep`` argument)."""
    def draw(p: float) -> Tensor:
        return (torch.rand(batch, generator=generator, device=device) >= p).float()
    return {"driving": draw(p_driving), "reference": draw(p_reference), "reference_normal": draw(p_reference_normal)}


def flow_matching_loss(model: Callable[..., Tensor], latents: Tensor, conditions: dict, sigma_kind: str = "shifted",
                       shift: float = 5.0, keep: dict[str, Tensor] | None = None,
                       generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """One flow-matching loss (fp32 MSE on v = ε − x0).

    ``model(x_t, timestep, **conditions, keep=keep)`` is a ``NormalDrivenWan``; ``conditions``
    holds reference_latent, driving_normals, reference_normal (and image_embeds / context)."""
    b = latents.shape[0]
    base = residual_base(model, conditions)
    if base is not None:
        latents = latents.float() - base
    sigma = sample_sigmas(b, sigma_kind, shift, generator=generator, device=latents.device)
    x_t, target = noisy_and_target(latents, sigma, generator=generator)
    pred = model(x_t, timestep_of(sigma), **conditions, keep=keep)
    loss = ((pred.float() - target) ** 2).mean()
    return loss, {"sigma_mean": sigma.mean().detach()}


@torch.no_grad()
def sample(model: Callable[..., Tensor], shape: tuple[int, ...], conditions: dict, steps: int = 30,
           guidance: float = 1.0, shift: float = 5.0, generator: torch.Generator | None = None,
           device=None, progress: bool = False) -> Tensor:
    """Euler sampling with diffusers' ``FlowMatchEulerDiscreteScheduler``; clean latents (fp32)
    (the flow's result + the reference base with ``reference_residual`` flavors).

    ``guidance`` != 1: classifier-free guidance over the normal conditions, v = v_u + g (v_c − v_u),
    where the unconditional pass drops driving and reference normals and keeps the reference
    image; both passes run as one batch of 2B."""
    from tqdm.auto import tqdm
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(steps, device=device)
    x = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    b = shape[0]
    base = residual_base(model, conditions)
    guided = guidance != 1.0
    if guided:
        conditions = {k: torch.cat([v, v]) if isinstance(v, Tensor) else v for k, v in conditions.items()}
        on = torch.cat([torch.ones(b, device=device), torch.zeros(b, device=device)])
        conditions["keep"] = {"driving": on, "reference_normal": on}
    for t in tqdm(scheduler.timesteps, disable=not progress, desc="sampling", unit="step"):
        if guided:
            v_c, v_u = model(torch.cat([x, x]), t.expand(2 * b).float(), **conditions).float().chunk(2)
            v = v_u + guidance * (v_c - v_u)
        else:
            v = model(x, t.expand(b).float(), **conditions).float()
        x = scheduler.step(v, t, x).prev_sample
    return x if base is None else x + base
