"""Losses, selected by name. GAN losses share one contract: `d_loss(d_reals, d_fakes)` and `g_loss(d_fakes)`
return per-sample values; regularisers take the critic and the batches. Reduction happens in the script."""

from losses.gan import HingeLoss, NonSaturatingLoss, WassersteinLoss, ganzo_targets, gradient_penalty, soft_real_targets

GAN_LOSSES = {"gan": NonSaturatingLoss, "wgan": WassersteinLoss, "wgan-gp": WassersteinLoss, "hinge": HingeLoss}

__all__ = ["GAN_LOSSES", "get_gan_loss", "ganzo_targets", "gradient_penalty", "soft_real_targets"]


def get_gan_loss(method: str):
    if method not in GAN_LOSSES:
        raise KeyError(f"unknown GAN method {method!r}; valid: {sorted(GAN_LOSSES)}")
    return GAN_LOSSES[method]()
