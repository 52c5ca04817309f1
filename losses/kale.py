"""KALE, the criterion of Generalized EBMs: the energy and log-partition step, the base step, GEBM's penalties and
gradient transform, and the Monte-Carlo log-partition.

Arbel, Zhou & Gretton 2021, arXiv 2003.05033, Sec. 3-4. Reference code read for facts: MichaelArbel/GeneralizedEBM
`compute.py` (kale, penalty_d, iterative_log_sum_exp) and `trainer.py` (iteration, compute_log_partition,
grad_clip, init_log_partition, compute_kale).

    KALE(P || G) = sup_{D, A}  -E_P[D + A] - E_G[exp(-(D + A))] + 1  <=  KL(P || G),
with equality when D = -log dP/dG + const. D is the energy network's output (`Energy.forward`), A the learned
scalar log-partition. Every function computes in at least fp32 (exp overflows in fp16) and returns a scalar: the
two expectations run over different batches (the latent batch is `noise_factor` times the data batch).
"""

import math

import torch

from modelling.common import at_least_fp32

PENALTIES = ["gradient_l2", "gradient", "l2", "none"]


def kale_energy_loss(d_reals: torch.Tensor, d_fakes: torch.Tensor, log_partition: torch.Tensor) -> torch.Tensor:
    """L_E = mean_x (D(x) + A) + mean_z exp(-(D(G(z)) + A)) - 1, minimised over D and A; -L_E is the minibatch
    KALE estimate. Its A-gradient 1 - mean exp(-(D(G(z)) + A)) vanishes exactly when A is the Monte-Carlo
    log-partition of the batch."""
    a = at_least_fp32(log_partition)
    return (at_least_fp32(d_reals) + a).mean() + torch.exp(-(at_least_fp32(d_fakes) + a)).mean() - 1


def batch_log_partition(d_fakes: torch.Tensor) -> torch.Tensor:
    """A_hat = log mean_i exp(-D(G(z_i))): the exact minimiser of L_E in A for this batch (differentiable in G)."""
    d = at_least_fp32(d_fakes)
    return torch.logsumexp(-d, dim=0) - math.log(d.shape[0])


def kale_base_loss(d_reals: torch.Tensor, d_fakes: torch.Tensor) -> torch.Tensor:
    """L_G = -mean_x (D(x) + A_hat): KALE with A replaced by its batch optimum, minimised over the base. Only A_hat
    depends on G; its gradient is sum_i softmax(-D(G(z)))_i grad D(G(z_i)): every fake moves down the energy,
    low-energy fakes with more weight."""
    return -(at_least_fp32(d_reals).mean() + batch_log_partition(d_fakes))


def kale_gradient_penalty(energy, reals: torch.Tensor, fakes: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """mean_i ||grad_x D(x_hat_i)||^2 at x_hat = a * real + (1 - a) * fake, a ~ U[0, 1] per sample, on the first
    min(len(reals), len(fakes)) of each: GEBM's `gradient` penalty, the squared norm with no "- 1" target (unlike
    WGAN-GP). `energy` must be an eager module (double backward); `scale` is the fp16 GradScaler's scale
    (PyTorch's AMP recipe, as losses.gan.gradient_penalty)."""
    n = min(len(reals), len(fakes))
    alpha = torch.rand(n, *[1] * (reals.dim() - 1), device=reals.device, dtype=reals.dtype)
    x_hat = (alpha * reals[:n].detach() + (1 - alpha) * fakes[:n].detach()).requires_grad_(True)
    (grads,) = torch.autograd.grad(at_least_fp32(energy(x_hat)).sum() * scale, x_hat, create_graph=True)
    return (at_least_fp32(grads) / scale).flatten(1).square().sum(dim=1).mean()


def l2_penalty(params: list[torch.Tensor], normalised: bool = False) -> torch.Tensor:
    """sum ||p||^2 over the energy network's parameters (A excluded); `normalised` divides by the sum over
    parameters of the sum of their shape's dimensions (GEBM's `gradient_l2` normaliser: a [128, 3, 3, 3] conv counts
    137, not its 3,456 entries)."""
    total = sum(at_least_fp32(p).square().sum() for p in params)
    return total / sum(sum(p.shape) for p in params) if normalised else total


def kale_penalty(penalty_type: str, energy, reals, fakes, scale: float = 1.0) -> torch.Tensor:
    """GEBM's `--penalty_type` on an `Energy` module (modelling/gebm.py); multiply by `--penalty_lambda`."""
    if penalty_type not in PENALTIES:
        raise ValueError(f"unknown penalty {penalty_type!r}; valid: {PENALTIES}")
    penalty = torch.zeros((), device=reals.device)
    if penalty_type in ("l2", "gradient_l2"):
        penalty = penalty + l2_penalty(energy.network_parameters(), normalised=penalty_type == "gradient_l2")
    if penalty_type in ("gradient", "gradient_l2"):
        penalty = penalty + kale_gradient_penalty(energy, reals, fakes, scale)
    return penalty


@torch.no_grad()
def transform_gradients(energy) -> None:
    """GEBM's "grad_clip" for the energy step, after backward and unscaling: each network gradient entry
    g -> 2g / (1 + g^2) (bounded by 1 in size, ~2g near 0), and A's gradient g -> g / (1 - g). With
    g = 1 - m, m = mean exp(-(D(G(z)) + A)), A's update direction becomes 1/m - 1. Entries that become non-finite
    are zeroed (GEBM); non-finite raw gradients never get here (the step is skipped, utils.optim)."""
    for p in energy.network_parameters():
        if p.grad is not None:
            p.grad.copy_(torch.nan_to_num(2 * p.grad / (1 + p.grad.square()), nan=0.0, posinf=0.0, neginf=0.0))
    g = energy.log_partition.grad
    if g is not None:
        g.copy_(torch.nan_to_num(g / (1 - g), nan=0.0, posinf=0.0, neginf=0.0))


@torch.no_grad()
def monte_carlo_log_partition(energy, base, latent_batches) -> torch.Tensor:
    """log mean exp(-D(G(z))) over every latent batch, a running logsumexp in float64 (GEBM's
    `init_log_partition`, --initialize_log_partition): the exact minimiser of L_E in A for fixed D and G. The sum
    starts empty (log 0 = -inf); GEBM's starts at log 1 = 0, one extra exp(0) in the sum."""
    total, count = torch.tensor(-math.inf, dtype=torch.float64), 0
    for zs in latent_batches:
        d = energy(base(zs)).double().cpu()
        total = torch.logaddexp(total, torch.logsumexp(-d, dim=0))
        count += len(d)
    return total - math.log(count)
