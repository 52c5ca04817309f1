"""Denoising losses. Each is a callable `loss_fn(denoiser, images, labels) -> per-sample loss (N,)`; the script
reduces. The denoiser supplies the schedule (alpha, beta) and the weight lambda(t) (modelling/precond.py); a loss
only decides how t is drawn and how pixels are reduced, each as its paper does."""

import torch

from utils.dist import unwrap


def _weighted_error(denoiser, images: torch.Tensor, t: torch.Tensor, labels) -> torch.Tensor:
    """lambda(t)·(D(alpha·x0 + beta·z; t) - x0)², elementwise, for per-sample times t (N,)."""
    shape = (-1, *[1] * (images.ndim - 1))
    schedule = unwrap(denoiser)  # the schedule lives on the plain module; the forward goes through DDP/compile
    alpha, beta = schedule.alpha(t).reshape(shape), schedule.beta(t).reshape(shape)
    noisy = alpha * images + beta * torch.randn_like(images)
    denoised = denoiser(noisy, t, labels)
    return schedule.loss_weight(t).reshape(shape) * (denoised - images) ** 2


# Karras et al. 2022, arXiv 2206.00364, Sec. 5 and Table 1. Ref: NVlabs/edm training/loss.py (EDMLoss).
class EDMLoss:
    """ln(sigma) ~ N(P_mean, P_std²) per image; the weighted squared error is *summed* over pixels (EDM divides
    the batch sum by the batch size, i.e. a per-image sum averaged over images)."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2):
        self.P_mean, self.P_std = P_mean, P_std

    def __call__(self, denoiser, images: torch.Tensor, labels=None) -> torch.Tensor:
        sigma = (torch.randn(images.shape[0], device=images.device) * self.P_std + self.P_mean).exp()
        return _weighted_error(denoiser, images, sigma, labels).flatten(1).sum(1)


# Ding et al. 2024, arXiv 2405.05512 ("denoiser matching"). Ref: burning489/CharacteristicGenerator sde.py.
class FollmerLoss:
    """t ~ U[eps0, 1] per sample (eps0 keeps lambda = 1/beta² finite at t -> 0); the weighted squared error is
    *averaged* over elements, as the reference does (a per-element mean, unlike EDM's per-image sum)."""

    def __init__(self, eps0: float = 1e-5):
        self.eps0 = eps0

    def __call__(self, denoiser, images: torch.Tensor, labels=None) -> torch.Tensor:
        t = self.eps0 + (1 - self.eps0) * torch.rand(images.shape[0], device=images.device)
        return _weighted_error(denoiser, images, t, labels).flatten(1).mean(1)
