"""GAN losses, label tricks and the gradient penalty. Stateless; every function returns per-sample values (N,)
and the script reduces them. D outputs are raw logits/scores of shape (N,)."""

import torch
import torch.nn.functional as F

from modelling.common import at_least_fp32


def _bce_logits(logits: torch.Tensor, targets: torch.Tensor | float) -> torch.Tensor:
    """-t log sigmoid(x) - (1 - t) log(1 - sigmoid(x)), written with softplus for stability."""
    return targets * F.softplus(-logits) + (1 - targets) * F.softplus(logits)


# Goodfellow et al. 2014, arXiv 1406.2661 (non-saturating G loss, Sec. 3). Ref: gau-nernst/gan losses.py.
class NonSaturatingLoss:
    """D: -log D(x) - log(1 - D(G(z))); G: -log D(G(z)). Targets default to 1 (real) / 0 (fake); per-sample
    targets carry Ganzo's soft/noisy labels (see `ganzo_targets`)."""

    def d_loss(self, d_reals, d_fakes, real_targets=1.0, fake_targets=0.0) -> torch.Tensor:
        return _bce_logits(d_reals, real_targets) + _bce_logits(d_fakes, fake_targets)

    def g_loss(self, d_fakes, real_targets=1.0) -> torch.Tensor:
        return _bce_logits(d_fakes, real_targets)


# Arjovsky et al. 2017, arXiv 1701.07875 (Algorithm 1); also the WGAN-GP critic loss, arXiv 1704.00028.
class WassersteinLoss:
    def d_loss(self, d_reals, d_fakes) -> torch.Tensor:
        return d_fakes - d_reals

    def g_loss(self, d_fakes) -> torch.Tensor:
        return -d_fakes


# Hinge loss in the SN-GAN form: Miyato et al. 2018, arXiv 1802.05957; Lim & Ye 2017, arXiv 1705.02894.
class HingeLoss:
    def d_loss(self, d_reals, d_fakes) -> torch.Tensor:
        return F.relu(1 - d_reals) + F.relu(1 + d_fakes)

    def g_loss(self, d_fakes) -> torch.Tensor:
        return -d_fakes


# Ganzo (andreaferretti/ganzo, loss.py): soft labels U[0.9, 1] / U[0, 0.1]; noisy labels swap a whole term's
# targets with probability p, one coin per batch and per term. Ganzo's bug (fake targets = 1 without soft labels)
# is not reproduced: hard fake targets are 0.
def ganzo_targets(n: int, soft: bool, noisy_p: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(real_targets, fake_targets) of shape (n,) for one discriminator step."""
    if soft:
        real_t = torch.empty(n, device=device).uniform_(0.9, 1.0)
        fake_t = torch.empty(n, device=device).uniform_(0.0, 0.1)
    else:
        real_t, fake_t = torch.ones(n, device=device), torch.zeros(n, device=device)
    if noisy_p > 0:
        swap_real, swap_fake = (torch.rand(2) < noisy_p).tolist()
        real_t, fake_t = (1 - real_t if swap_real else real_t), (1 - fake_t if swap_fake else fake_t)
    return real_t, fake_t


def soft_real_targets(n: int, soft: bool, device=None) -> torch.Tensor | float:
    """Targets for the G loss: clean (1), or soft U[0.9, 1] when soft labels are on (Ganzo)."""
    return torch.empty(n, device=device).uniform_(0.9, 1.0) if soft else 1.0


# WGAN-GP: Gulrajani et al. 2017, arXiv 1704.00028, Algorithm 1 (two-sided penalty, lambda applied by the caller).
# Mixed precision: PyTorch's AMP recipe for gradient penalties (docs "Automatic Mixed Precision examples",
# "Gradient penalty"): scale the output before autograd.grad so fp16 gradients do not underflow, then unscale.
def gradient_penalty(
    critic, reals, fakes, labels=None, scale: float = 1.0, one_sided: bool = False, center: float = 1.0
) -> torch.Tensor:
    """Per-sample (||grad_x D(x_hat)|| - center)^2 at x_hat = eps * real + (1 - eps) * fake, eps ~ U[0, 1] per sample
    (center 1: WGAN-GP; 0: the zero-centred penalty of GPM's configs). `labels` is passed on as D's second input
    (class labels, or the time of a time-conditioned critic); samples may be images or flat points.

    `critic` must be an eager module (never torch.compile'd: double backward through compiled graphs is wrong or
    unsupported, pytorch #91469). `scale` is the GradScaler's current scale under fp16, else 1.
    """
    eps = torch.rand(reals.shape[0], *[1] * (reals.ndim - 1), device=reals.device, dtype=reals.dtype)
    x_hat = (eps * reals.detach() + (1 - eps) * fakes.detach()).requires_grad_(True)
    d_hat = critic(x_hat, labels)
    (grads,) = torch.autograd.grad(at_least_fp32(d_hat).sum() * scale, x_hat, create_graph=True)  # fp32 product
    grad_norm = (at_least_fp32(grads) / scale).flatten(1).norm(dim=1)  # norm in fp32 from unscaled gradients
    excess = grad_norm - center
    return (excess.clamp(min=0) if one_sided else excess).square()


# R1: Mescheder et al. 2018, arXiv 1801.04406, Eq. 9 (gamma / 2 and the lazy-regularisation gain applied by the
# caller). Same fp16 recipe and eager-module rule as `gradient_penalty`.
def r1_penalty(critic, reals, labels=None, scale: float = 1.0) -> torch.Tensor:
    """Per-sample squared gradient norm ||grad_x D(x)||^2 at the real images."""
    x = reals.detach().requires_grad_(True)
    (grads,) = torch.autograd.grad(at_least_fp32(critic(x, labels)).sum() * scale, x, create_graph=True)
    return (at_least_fp32(grads) / scale).flatten(1).square().sum(dim=1)


# Path-length regularisation: Karras et al. 2020, arXiv 1912.04958, Sec. 3.2, Eq. 4, as run in StyleGAN2-ADA
# `loss.py` (y scaled by 1 / sqrt(H W), lengths averaged over the num_ws copies of w).
def path_lengths(images: torch.Tensor, ws: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Per-sample ||J_w^T y||, y ~ N(0, I) / sqrt(H W), with J the Jacobian of the images w.r.t. the broadcast
    latents `ws` (N, num_ws, w_dim): sqrt(mean over the num_ws copies of the squared norm over w_dim). The
    penalty is (length - a)^2 with `a` the running mean of the lengths, kept by the caller."""
    h, w = images.shape[-2:]
    y = torch.randn_like(images) / (h * w) ** 0.5
    (grads,) = torch.autograd.grad((at_least_fp32(images) * at_least_fp32(y)).sum() * scale, ws, create_graph=True)
    return (at_least_fp32(grads) / scale).square().sum(dim=2).mean(dim=1).sqrt()
