"""Samplers shared by sample.py, the training scripts' in-loop grids and evaluations, and `--only_test`.

Every sample function has the signature `sample_fn(model, seeds, labels, device, **settings) -> (samples, nfe)`:
sample k is drawn from its own RNG seeded with seeds[k], so it depends on its seed only, not on the batch or the
number of processes. `SNAPSHOT_KINDS` maps a snapshot's kind to (builder, sample function). GEBM snapshots sample
by latent MCMC (sampling/latent_mcmc.py); with default settings they give the base generator's samples.
"""

import torch

from modelling import (
    build_denoiser,
    build_discr_flow,
    build_gebm,
    build_generator,
    build_score_gan_generator,
    build_translator,
)
from sampling.diffusion import StackedNoise, sample
from sampling.latent_mcmc import gebm_images
from sampling.particles import discr_flow_images


def seed_latents(seeds: list[int], z_dim: int) -> torch.Tensor:
    """One standard normal latent per seed, from that seed's own generator: (len(seeds), z_dim)."""
    return torch.stack([torch.randn(z_dim, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def truncated_latents(seeds: list[int], z_dim: int, threshold: float) -> torch.Tensor:
    """BigGAN's truncation trick (arXiv 1809.11096, Sec. 3.1): z ~ N(0, I) with every entry of magnitude above
    `threshold` redrawn until none is, from that seed's own generator (so still one latent per seed)."""
    rows = []
    for s in seeds:
        rng = torch.Generator().manual_seed(int(s))
        z = torch.randn(z_dim, generator=rng)
        while (outside := z.abs() > threshold).any():
            z[outside] = torch.randn(int(outside.sum()), generator=rng)
        rows.append(z)
    return torch.stack(rows)


@torch.no_grad()
def gan_images(generator, seeds: list[int], labels, device, **settings):
    """One network evaluation (NFE 1). In eval mode the style generators use their stored noise maps, so image k
    depends on its seed only; `settings` are generator keyword arguments (truncation, truncation_cutoff), except for
    generators that truncate their latents (BigGAN), for which `truncation` is the threshold of `truncated_latents`."""
    if getattr(generator, "truncates_latents", False) and settings.get("truncation") is not None:
        zs = truncated_latents(seeds, generator.z_dim, settings.pop("truncation"))
    else:
        zs = seed_latents(seeds, generator.z_dim)
    return generator(zs.to(device), labels, **settings), 1


@torch.no_grad()
def diffusion_images(denoiser, seeds: list[int], labels, device, **settings):
    """Latents and every later noise draw from each seed's own generator (EDM's StackedRandomGenerator); the
    method's default solver unless `settings` say otherwise (one flow-map step for a distilled generator)."""
    settings.setdefault("num_steps", 1 if denoiser.two_time else 18)
    images, nfe = sample(denoiser, StackedNoise(seeds), labels, device=device, **settings)
    return images.float(), nfe


@torch.no_grad()
def translated_images(translator, inputs: torch.Tensor, labels, device, **settings):
    """Image-to-image translation: the second argument is a batch of input images in [-1, 1], not seeds; one output
    per input (`settings`: reverse=True runs a CycleGAN snapshot's B -> A generator)."""
    return translator(inputs.to(device), **settings), 1


# Characteristic generators are two-time denoisers: the diffusion sampler runs them with its "characteristic" solver.
SNAPSHOT_KINDS = {
    "gan": (build_generator, gan_images),
    "diffusion": (build_denoiser, diffusion_images),
    "characteristic": (build_denoiser, diffusion_images),
    "translation": (build_translator, translated_images),
    # GPM: ScoreGAN's generator samples in one pass; Discriminator Flow has no generator, its critic's flow samples.
    "score_gan": (build_score_gan_generator, gan_images),
    "discr_flow": (build_discr_flow, discr_flow_images),
    "gebm": (build_gebm, gebm_images),
}
