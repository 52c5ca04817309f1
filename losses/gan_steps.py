"""How a GAN's D and G steps assemble their losses, written once for gan_mnist.py and gan_celeba.py (each loop calls
these, and tests/test_learning.py pins them against the formulas computed by hand).

`cfg` is a GAN script's Config: `method`, `soft_labels`, `noisy_labels`, `gp_lambda`, `clip_value`, `ortho_reg`, and
in gan_celeba.py also `drift_penalty`, `r1_gamma` and `r1_interval` (gan_mnist.py refuses those regularisers, so
there they count as off).
"""

import torch

from losses.auxiliary import orthogonal_penalty
from losses.gan import ganzo_targets, gradient_penalty, r1_penalty, soft_real_targets
from utils.dist import unwrap


def judge(disc, images: torch.Tensor, labels: torch.Tensor | None, aux: bool):
    """D's source logits (N,) and, for AC-GAN (`aux`), its class logits (N, n_classes) (else None)."""
    return disc(images, labels, aux=True) if aux else (disc(images, labels), None)


def d_step_loss(cfg, disc, loss_fn, aux_loss, reals, fakes, labels, scale: float = 1.0):
    """(loss, logged terms) of one D step: the adversarial loss (NS-GAN with Ganzo's targets, WGAN, hinge), plus
    AC-GAN's class cross-entropy on reals and on fakes (each for its own labels), plus ProGAN's eps_drift * mean
    D(real)^2, plus WGAN-GP's lambda * penalty, plus R1's gamma / 2 * ||grad D(real)||^2 when it runs every step
    (lazy R1 is gan_celeba.py's own step). The fakes are detached: this step's gradient reaches D only. `scale`:
    the GradScaler's scale under fp16."""
    fakes = fakes.detach()
    (d_reals, c_reals), (d_fakes, c_fakes) = (judge(disc, x, labels, aux_loss is not None) for x in (reals, fakes))
    if cfg.method == "gan":
        real_targets, fake_targets = ganzo_targets(reals.shape[0], cfg.soft_labels, cfg.noisy_labels, reals.device)
        loss = loss_fn.d_loss(d_reals, d_fakes, real_targets, fake_targets).mean()
    else:
        loss = loss_fn.d_loss(d_reals, d_fakes).mean()
    stats = {"loss/d": loss, "d/real": d_reals.mean(), "d/fake": d_fakes.mean()}
    if aux_loss:  # AC-GAN: D also learns the class of reals (their labels) and of fakes (the labels drawn)
        loss_class = aux_loss.d_loss(c_reals, c_fakes, labels, labels).mean()
        loss = loss + loss_class
        stats |= {"loss/d_class": loss_class, "d/class_acc": (c_reals.argmax(1) == labels).float().mean()}
    drift_weight = getattr(cfg, "drift_penalty", 0.0)
    if drift_weight > 0:  # ProGAN: keeps the critic's outputs near 0
        drift = d_reals.float().square().mean()
        loss = loss + drift_weight * drift
        stats["penalty/drift"] = drift
    if cfg.method == "wgan-gp":
        # Second-order gradients run on the eager module (never compiled); under fp16 the penalty is taken from
        # gradients of the scaled output, then unscaled (PyTorch's AMP gradient-penalty recipe).
        gp = gradient_penalty(unwrap(disc), reals, fakes, labels, scale=scale).mean()
        loss = loss + cfg.gp_lambda * gp
        stats["penalty/gp"] = gp
    r1_gamma = getattr(cfg, "r1_gamma", 0.0)
    if r1_gamma > 0 and cfg.r1_interval == 1:  # R1 every step (StyleGAN)
        r1 = r1_penalty(unwrap(disc), reals, labels, scale=scale).mean()
        loss = loss + r1_gamma / 2 * r1
        stats["penalty/r1"] = r1
    return loss, stats


def clip_critic(cfg, disc) -> None:
    """After each D update under --method wgan, clip every critic parameter to [-clip_value, clip_value] (WGAN
    Algorithm 1); other methods leave D as it is."""
    if cfg.method == "wgan":
        with torch.no_grad():
            for p in disc.parameters():
                p.clamp_(-cfg.clip_value, cfg.clip_value)


def g_step_due(step: int, train_g_interval: int) -> bool:
    """One G step every `train_g_interval` D steps (WGAN's n_critic, BigGAN's 2), the first at step 0."""
    return step % train_g_interval == 0


def g_step_loss(cfg, gen, disc, loss_fn, aux_loss, zs, labels):
    """(loss, logged terms) of one G step on G(zs): the adversarial loss (soft real targets under --soft_labels),
    plus AC-GAN's class cross-entropy on the fakes (the labels they were drawn for), plus BigGAN's beta * orthogonal
    penalty of G. The loop freezes D around this step, so only G receives its gradient."""
    d_fakes, c_fakes = judge(disc, gen(zs, labels), labels, aux_loss is not None)
    if cfg.method == "gan":
        loss = loss_fn.g_loss(d_fakes, soft_real_targets(zs.shape[0], cfg.soft_labels, zs.device)).mean()
    else:
        loss = loss_fn.g_loss(d_fakes).mean()
    stats = {}
    if aux_loss:  # AC-GAN: G wants its fakes classified as the labels they were drawn for
        loss_class = aux_loss.g_loss(c_fakes, labels).mean()
        loss = loss + loss_class
        stats["loss/g_class"] = loss_class
    if cfg.ortho_reg > 0:  # BigGAN: push G's filters towards orthogonality (norms left free)
        ortho = orthogonal_penalty(unwrap(gen))
        loss = loss + cfg.ortho_reg * ortho
        stats["penalty/ortho"] = ortho
    return loss, stats | {"loss/g": loss}
