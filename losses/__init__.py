"""Losses, selected by name. GAN losses share one contract: `d_loss(d_reals, d_fakes)` and `g_loss(d_fakes)`
return per-sample values; regularisers take the critic and the batches. Diffusion losses are callables
`loss_fn(denoiser, images, labels) -> (N,)`. Reduction happens in the script."""

from losses.auxiliary import AuxClassifierLoss, orthogonal_penalty
from losses.diffusion import EDMLoss, FollmerLoss
from losses.gan import (
    HingeLoss,
    NonSaturatingLoss,
    WassersteinLoss,
    ganzo_targets,
    gradient_penalty,
    path_lengths,
    r1_penalty,
    soft_real_targets,
)
from losses.translation import LeastSquaresLoss, Pix2PixLoss, cycle_loss, identity_loss, l1_distance

GAN_LOSSES = {"gan": NonSaturatingLoss, "wgan": WassersteinLoss, "wgan-gp": WassersteinLoss, "hinge": HingeLoss}
DIFFUSION_LOSSES = {"edm": EDMLoss, "follmer": FollmerLoss}

__all__ = [
    "AuxClassifierLoss",
    "LeastSquaresLoss",
    "Pix2PixLoss",
    "cycle_loss",
    "identity_loss",
    "l1_distance",
    "orthogonal_penalty",
    "DIFFUSION_LOSSES",
    "GAN_LOSSES",
    "get_diffusion_loss",
    "get_gan_loss",
    "ganzo_targets",
    "gradient_penalty",
    "path_lengths",
    "r1_penalty",
    "soft_real_targets",
]


def _lookup(registry: dict, name: str, what: str):
    if name not in registry:
        raise KeyError(f"unknown {what} {name!r}; valid: {sorted(registry)}")
    return registry[name]


def get_gan_loss(method: str):
    return _lookup(GAN_LOSSES, method, "GAN method")()


def get_diffusion_loss(method: str, **kwargs):
    return _lookup(DIFFUSION_LOSSES, method, "diffusion method")(**kwargs)
