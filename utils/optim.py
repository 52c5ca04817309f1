"""GAN optimizers, with StyleGAN2's lazy-regularisation adjustment.

When a regulariser runs as its own optimizer step every k minibatches (StyleGAN2, arXiv 1912.04958, App. B), the
network takes k + 1 steps per k minibatches; scaling the learning rate by c = k / (k + 1) and the Adam betas to
beta^c keeps the optimizer's time constants per minibatch unchanged (StyleGAN2-ADA `training_loop.py`):
lr 0.002, k = 16 -> 0.0018824, beta2 0.99 -> 0.990585.
"""

import torch

OPTIMIZERS = ["Adam", "AdamW", "RMSprop"]


def set_hyperparameters(optimizer, lr: float, betas: tuple[float, float], reg_interval: int = 1) -> None:
    """(Re)set lr and betas on every group: at creation, and after loading a saved optimizer state on resume
    (the saved groups carry the old values)."""
    ratio = reg_interval / (reg_interval + 1) if reg_interval > 1 else 1.0
    for group in optimizer.param_groups:
        group["lr"] = lr * ratio
        if "betas" in group:
            group["betas"] = (betas[0] ** ratio, betas[1] ** ratio)


def make_optimizer(name: str, params, lr: float, betas: tuple[float, float], reg_interval: int = 1):
    """Adam/AdamW (no weight decay: GANs do not use it) or RMSprop (WGAN), adjusted for lazy regularisation."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {OPTIMIZERS}")
    optimizer = torch.optim.RMSprop(params, lr=lr) if name == "RMSprop" else getattr(torch.optim, name)(params, lr=lr)
    set_hyperparameters(optimizer, lr, betas, reg_interval)
    return optimizer
