"""Losses of GPM's generative particle models (Franceschi et al. 2023, arXiv 2305.16150): the particle velocity of
Discriminator Flow and the two losses of ScoreGAN. Per-sample values (N,); the scripts reduce.
Reference code read for facts only: White-Link/gpm gpm/models/gan/losses.py, gpm/models/discr_flow/base.py,
gpm/models/score_gan/score_gan.py.

Discriminator Flow uses GPM's three GAN losses, which are genzoo's (losses/gan.py) under GPM's names:
  vanilla = NonSaturatingLoss   D: softplus(-c(x)) + softplus(c(z)),  g(z) = softplus(-c(z)),  u = sigmoid(-c)·∇c
  ipm     = WassersteinLoss     D: c(z) - c(x),                       g(z) = -c(z),            u = ∇c
  hinge   = HingeLoss           D: relu(1 - c(x)) + relu(1 + c(z)),   g(z) = -c(z),            u = ∇c
with the particle velocity u = -∇_z g. genzoo's critic c is high on data, as every genzoo critic. GPM writes its IPM
critic the other way round, f = -c (trained by f(x) - f(z), so high on particles, which descend it: u = -∇f); that
is the same critic with the opposite sign, the same flow and the same gradient penalty.
"""

import torch

from losses.gan import HingeLoss, NonSaturatingLoss, WassersteinLoss
from modelling.common import at_least_fp32

PARTICLE_LOSSES = {"vanilla": NonSaturatingLoss, "ipm": WassersteinLoss, "hinge": HingeLoss}


def particle_loss(name: str):
    if name not in PARTICLE_LOSSES:
        raise KeyError(f"unknown particle loss {name!r}; valid: {sorted(PARTICLE_LOSSES)}")
    return PARTICLE_LOSSES[name]()


# GPM Sec. 4.1 and `discr_vector_field`: u(z, t) = -∇_z sum_b g(c(z_b, t_b)). The critic has no batch statistics, so
# the gradient of the sum is each particle's own gradient. Works inside no_grad (the evaluators' and sample.py's).
def particle_velocity(critic, z: torch.Tensor, t: torch.Tensor, loss, scale: float = 1.0) -> torch.Tensor:
    """The velocity of each particle in fp32, (B, *shape). `scale` > 1 is PyTorch's AMP recipe under fp16: the
    gradient of the scaled sum, unscaled in fp32, so that small input gradients do not underflow."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        g = loss.g_loss(at_least_fp32(critic(z, t))).sum()
        (grad,) = torch.autograd.grad(g * scale, z)
    return -(at_least_fp32(grad) / scale)


# ScoreGAN noise law (GPM `sample_noise_level`): EDM's sampling grid made continuous, u ~ U[0, 1].
def score_gan_sigma(n: int, sigma_min: float, sigma_max: float, rho: float, device=None) -> torch.Tensor:
    """sigma = (sigma_max^(1/rho) + u·(sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, (n,)."""
    u = torch.rand(n, device=device)
    return (sigma_max ** (1 / rho) + u * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def _noisy(fakes: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return fakes.float() + sigma.reshape(-1, *[1] * (fakes.ndim - 1)) * torch.randn_like(fakes, dtype=torch.float32)


# ScoreGAN's score step (GPM `forward_score_noise`): denoising score matching on the generator's samples. Unlike EDM's
# loss there is no lambda(sigma) weight: a per-sample sum of squared errors.
def generator_score_loss(denoiser, fakes: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """sum over elements of (D_gen(x + sigma·n; sigma) - x)², per sample, for generator samples x (no gradient)."""
    fakes = fakes.detach().float()
    return (denoiser(_noisy(fakes, sigma), sigma).float() - fakes).square().flatten(1).sum(1)


# ScoreGAN's generator step (GPM `forward_generator`, paper Eq. 13): with the sigma-scaled scores
# S(x) = (D(x; sigma) - x)/sigma = sigma·∇log p_sigma(x), the direction Delta = w_gen·S_gen - w_data·S_data is held
# fixed (no gradient into either score network) and the generator descends sum x~·Delta at x~ = G(z) + sigma·n, so
# its samples move along sigma·(w_data ∇log p_data - w_gen ∇log p_gen): a noise-averaged KL gradient flow.
def score_gan_loss(
    fakes: torch.Tensor, data_denoiser, gen_denoiser, sigma: torch.Tensor, w_data: float = 1.0, w_gen: float = 1.0
) -> torch.Tensor:
    """Per-sample surrogate sum x~·sg[Delta]; only `fakes` (G's output, with its graph) gets gradients."""
    noisy = _noisy(fakes, sigma)
    s = sigma.reshape(-1, *[1] * (fakes.ndim - 1))
    with torch.no_grad():
        x = noisy.detach()
        s_data = (data_denoiser(x, sigma).float() - x) / s
        s_gen = (gen_denoiser(x, sigma).float() - x) / s
        delta = w_gen * s_gen - w_data * s_data
    return (noisy * delta).flatten(1).sum(1)
