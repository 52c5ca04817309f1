"""The particle flow of Discriminator Flow (GPM, Franceschi et al. 2023, arXiv 2305.16150, Sec. 4.1; White-Link/gpm
`partial_generate_like`), shared by discriminator_flow.py (training particles), the evaluators and sample.py.

Euler steps on the uniform grid t_k = k/K of the flow's K = total_steps (default: the snapshot's n_steps):
    z_{k+1} = z_k + (eta/K)·u(z_k, t_k) + 1[k < K - 1]·sqrt(entropy_reg/K)·eps_k,     z_0 ~ N(p_mean, p_std² I)
with u the particle velocity of the flow's loss (losses/particle.py). `num_steps` < K stops early on the same grid
(GPM's "14 of 56" evaluation). Particles stay in fp32 whatever the critic computes in.
"""

import math

import torch

from losses.particle import particle_loss, particle_velocity
from sampling.diffusion import StackedNoise
from utils.cli import UserError


def discriminator_flow(
    model,
    z: torch.Tensor,
    num_steps: int | None = None,
    total_steps: int | None = None,
    noise=None,  # noise(shape) -> a standard normal draw for the entropy term (default: torch's global RNG)
    trajectory: bool = False,
    scale: float = 1.0,  # fp16 loss scale for the input gradients (losses/particle.py)
) -> torch.Tensor:
    """Run `num_steps` flow steps from z (B, *shape); return the final particles, or with `trajectory` every state
    (num_steps + 1, B, *shape). `model` is a (plain, unwrapped) DiscriminatorFlow."""
    total = total_steps or model.n_steps
    steps = total if num_steps is None else num_steps
    loss, z = particle_loss(model.loss), z.float()
    states = [z]
    for k in range(steps):
        t = torch.full((z.shape[0],), k / total, device=z.device)
        z = z + (model.eta / total) * particle_velocity(model.critic, z, t, loss, scale)
        if model.entropy_reg > 0 and k < total - 1:
            eps = noise(z.shape) if noise is not None else torch.randn_like(z)
            z = z + math.sqrt(model.entropy_reg / total) * eps
        if trajectory:
            states.append(z)
    return torch.stack(states) if trajectory else z


def flow_settings(model, num_steps: int | None, total_steps: int | None) -> dict:
    """sample.py's flags for a Discriminator Flow snapshot, resolved: GPM's defaults are the snapshot's K for both,
    and `total_steps` follows `num_steps` when only that is given (GPM's `total_nb_steps` default)."""
    num = model.n_steps if num_steps is None else num_steps
    total = total_steps if total_steps is not None else (num if num_steps is not None else model.n_steps)
    if not 1 <= num <= total:
        raise UserError(f"need 1 <= --num_steps <= --total_steps, got {num} and {total}")
    return dict(num_steps=num, total_steps=total)


def discr_flow_images(model, seeds: list[int], labels, device, trajectory: bool = False, **settings):
    """Samples of a DiscriminatorFlow: each seed's own generator draws its starting particle and every later noise
    (EDM's StackedRandomGenerator contract), so a sample depends on its seed only. NFE = flow steps, each one critic
    forward and one input gradient."""
    settings = flow_settings(model, settings.get("num_steps"), settings.get("total_steps"))
    gen = StackedNoise(seeds)
    z = model.p_mean + model.p_std * gen.randn(model.sample_shape, device).float()
    noise = lambda shape: gen.randn(tuple(shape[1:]), device).float()
    out = discriminator_flow(model, z, noise=noise, trajectory=trajectory, **settings)
    return out, settings["num_steps"]
