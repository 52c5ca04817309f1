"""Samplers shared by sample.py, the training scripts' in-loop grids and evaluations, and `--only_test`.

Every sample function has the signature `sample_fn(model, seeds, labels, device, **settings) -> (samples, nfe)`:
sample k is drawn from its own RNG seeded with seeds[k], so it depends on its seed only, not on the batch or the
number of processes. `SNAPSHOT_KINDS` maps a snapshot's kind to (builder, sample function). GEBM snapshots sample
by latent MCMC (sampling/latent_mcmc.py); with default settings they give the base generator's samples.
"""

import torch

from modelling import build_denoiser, build_gebm, build_generator
from sampling.diffusion import StackedNoise, sample
from sampling.latent_mcmc import gebm_images


def seed_latents(seeds: list[int], z_dim: int) -> torch.Tensor:
    """One standard normal latent per seed, from that seed's own generator: (len(seeds), z_dim)."""
    return torch.stack([torch.randn(z_dim, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def gan_images(generator, seeds: list[int], labels, device, **settings):
    """One network evaluation (NFE 1). In eval mode the style generators use their stored noise maps, so image k
    depends on its seed only; `settings` are generator keyword arguments (truncation, truncation_cutoff)."""
    return generator(seed_latents(seeds, generator.z_dim).to(device), labels, **settings), 1


@torch.no_grad()
def diffusion_images(denoiser, seeds: list[int], labels, device, **settings):
    """Latents and every later noise draw from each seed's own generator (EDM's StackedRandomGenerator); the
    method's default solver unless `settings` say otherwise (one flow-map step for a distilled generator)."""
    settings.setdefault("num_steps", 1 if denoiser.two_time else 18)
    images, nfe = sample(denoiser, StackedNoise(seeds), labels, device=device, **settings)
    return images.float(), nfe


# Characteristic generators are two-time denoisers: the diffusion sampler runs them with its "characteristic" solver.
SNAPSHOT_KINDS = {
    "gan": (build_generator, gan_images),
    "diffusion": (build_denoiser, diffusion_images),
    "characteristic": (build_denoiser, diffusion_images),
    "gebm": (build_gebm, gebm_images),
}
