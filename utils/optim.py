"""Optimizers: building them (GAN recipes, with StyleGAN2's lazy-regularisation adjustment), taking one step
(`step_optimizer`: clip, skip non-finite gradients) and the non-finite-step policy every training loop shares
(`SkipCounter`).

When a regulariser runs as its own optimizer step every k minibatches (StyleGAN2, arXiv 1912.04958, App. B), the
network takes k + 1 steps per k minibatches; scaling the learning rate by c = k / (k + 1) and the Adam betas to
beta^c keeps the optimizer's time constants per minibatch unchanged (StyleGAN2-ADA `training_loop.py`):
lr 0.002, k = 16 -> 0.0018824, beta2 0.99 -> 0.990585.
"""

from pathlib import Path

import torch

from utils.ckpt import list_states
from utils.cli import UserError

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


def step_optimizer(
    accelerator, optimizer, model, max_norm: float = float("inf"), transform=None
) -> tuple[bool, torch.Tensor]:
    """Clip and apply the update unless the gradients are non-finite; return (applied, gradient norm).
    `transform()`, if given, rewrites the unscaled gradients in place before the step (GEBM's energy step)."""
    # Unscale this optimizer's gradients only: unscaling several optimizers at once would count another network's
    # stale overflow against this step and halve the fp16 loss scale again.
    accelerator.unscale_gradients(optimizer=optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if transform is not None:
        transform()
    if accelerator.scaler is not None:
        optimizer.step()  # the GradScaler skips inf/NaN steps itself and lowers its scale
        return not optimizer.step_was_skipped, grad_norm
    if torch.isfinite(grad_norm):
        optimizer.step()
        return True, grad_norm
    return False, grad_norm


class SkipCounter:
    """Non-finite policy: a step whose update was skipped (inf/NaN gradients, e.g. an fp16 overflow) is counted;
    `max_in_a_row` skipped steps in a row stop the run with one line naming the newest training state."""

    def __init__(self, max_in_a_row: int, states_dir: Path, total: int = 0):
        self.max_in_a_row, self.states_dir, self.total, self.in_a_row = max_in_a_row, states_dir, total, 0

    def update(self, applied: bool, step: int) -> None:
        if applied:
            self.in_a_row = 0
            return
        self.total, self.in_a_row = self.total + 1, self.in_a_row + 1
        if self.in_a_row >= self.max_in_a_row:
            states = list_states(self.states_dir)
            last = f"the newest training state is {states[-1][1]}" if states else "no training state was saved"
            raise UserError(
                f"stopping at step {step + 1}: {self.in_a_row} steps in a row had non-finite gradients "
                f"(lower --lr?); {last}"
            )
