"""Characteristic matching: distil a diffusion teacher's probability-flow ODE into a two-time flow map G(x, t, s).

Ding et al. 2024, "Characteristic Learning for One Step Generation", arXiv 2405.05512 (reference code
CharacteristicGenerator's sde.py `compute_characteristic_loss`), the scheme of CTM (Kim et al. 2023,
arXiv 2310.02279) with its target_model_sg / model / model_sg choices. On a grid t_0 > ... > t_{N-1} of the
teacher's times, for a jump of n grid steps:
    x_t = alpha_t·x0 + beta_t·z,        u = t + n steps,    s uniform on the grid at or after u
    student   y  = G_theta(x_t, t, s)                    (gradient flows)
    teacher   x_u = n solver steps of the frozen teacher from x_t        (no gradient)
    target    y* = sg[G_theta(x_u, u, s)]                (online weights, no gradient)
    loss      dist(G_target(y, s, 0), sg[G_target(y*, s, 0)])   (target = EMA weights, frozen; gradient flows
              through y only), compared at the data end, where the distance (LPIPS in particular) means something.
genzoo's grid may end with the data end t = 0 (distill_characteristic.py --train_data_end, the default), so that
G(x, t, 0), the map the one-step sampler uses, is trained directly; CharacteristicGenerator stops the grid at t_min and
leaves G(., ., 0) to extrapolation from s = t_min. The script adds w·L_dsm (the teacher's own denoising loss on G's
denoiser with s = t) with the adaptive weight
`adaptive_weight`. Everything here returns per-sample values; the script reduces.
"""

import math

import torch

from modelling.precond import flow_map
from sampling.diffusion import ode_step

JUMP_WEIGHTINGS = ("weighted", "uniform")  # P(n = k) proportional to k (CharacteristicGenerator's default), or uniform


def l2_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample (CharacteristicGenerator's `l2`)."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


# Song & Dhariwal 2023 ("Improved techniques for training consistency models", iCT), arXiv 2310.14189, Sec. 3.3.
def pseudo_huber_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sqrt(||a - b||² + c²) - c per sample with iCT's c = 0.00054·sqrt(d): quadratic for tiny errors, linear
    (robust to outliers) for large ones; needs no pretrained network."""
    c = 0.00054 * math.sqrt(a[0].numel())
    return ((a.float() - b.float()).pow(2).flatten(1).sum(1) + c**2).sqrt() - c


def sample_jumps(
    grid_size: int, batch: int, weighting: str, jump_rng: torch.Generator, device, max_jump: int | None = None
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(n, i_t, i_s): one jump length n for the batch (from `jump_rng`, shared by every process so all ranks solve
    the same number of teacher steps), per-sample start indices i_t ~ U{0..N-n-1} and end indices
    i_s ~ U{i_t + n .. N-1} (from the global RNG, per process)."""
    max_jump = min(max_jump or grid_size - 1, grid_size - 1)
    ks = torch.arange(1, max_jump + 1, dtype=torch.float64)
    probs = ks if weighting == "weighted" else torch.ones_like(ks)
    n = int(ks[torch.multinomial(probs, 1, generator=jump_rng)])
    i_t = torch.randint(0, grid_size - n, (batch,), device=device)
    i_s = i_t + n + (torch.rand(batch, device=device) * (grid_size - i_t - n)).long()  # U{i_t + n .. N-1}
    return n, i_t, i_s


@torch.no_grad()
def teacher_solve(teacher, x: torch.Tensor, grid: torch.Tensor, i_t: torch.Tensor, n: int, labels, solver: str):
    """n steps of the frozen teacher ODE from grid[i_t] to grid[i_t + n], each sample from its own time. A step
    into t = 0 (the grid's data end) is the samplers' final step x <- D(x; t) whatever the solver: Euler and Heun
    would divide by beta(0) = 0 there."""

    def denoise(x, t):
        return teacher(x, t, labels)

    shape = (-1, *[1] * (x.ndim - 1))
    for k in range(n):
        t, t_next = grid[i_t + k], grid[i_t + k + 1]
        to_data = t_next == 0
        if solver == "deis" or not to_data.any():  # DEIS into t = 0 is exactly D(x; t)
            x = ode_step(denoise, teacher, x, t, t_next, solver)
        else:
            x_ode = ode_step(denoise, teacher, x, t, torch.where(to_data, t, t_next), solver)
            x = torch.where(to_data.reshape(shape), ode_step(denoise, teacher, x, t, t_next, "deis"), x_ode)
    return x


def characteristic_loss(
    student,
    target,
    teacher,
    x0: torch.Tensor,
    labels: torch.Tensor | None,
    grid: torch.Tensor,
    n: int,
    i_t: torch.Tensor,
    i_s: torch.Tensor,
    distance,
    teacher_solver: str = "deis",
) -> torch.Tensor:
    """Per-sample characteristic-matching loss (N,). `student` may be DDP/compile-wrapped (its forward takes
    (x, t, labels, s)); `target` and `teacher` are frozen plain modules with the same schedule as the student."""
    schedule = teacher  # alpha/beta of the shared interpolant
    t, u, s = grid[i_t], grid[i_t + n], grid[i_s]  # t > 0 always; u and s may be the data end 0
    shape = (-1, *[1] * (x0.ndim - 1))
    x_t = (schedule.alpha(t).reshape(shape) * x0 + schedule.beta(t).reshape(shape) * torch.randn_like(x0)).float()
    # Rows already at the data end skip the networks (G(y, 0, 0) = y); they are evaluated at time t instead, a
    # finite stand-in that torch.where discards, gradient included.
    s_is_data, u_is_data = (s == 0).reshape(shape), (u == 0).reshape(shape)

    def to_data(y):  # G_target(y, s, 0) = D_target(y, s, 0): the target network's view of y at the data end
        s_net = torch.where(s == 0, t, s)
        return torch.where(s_is_data, y, target(y, s_net, labels, torch.zeros_like(s)))

    y = flow_map(schedule, x_t, t, s, student(x_t, t, labels, s))
    with torch.no_grad():
        x_u = teacher_solve(teacher, x_t, grid, i_t, n, labels, teacher_solver)
        u_net = torch.where(u == 0, t, u)
        y_star = torch.where(u_is_data, x_u, flow_map(schedule, x_u, u_net, s, student(x_u, u_net, labels, s)))
        data_star = to_data(y_star)
    return distance(to_data(y), data_star)


def adaptive_weight(
    loss_char: torch.Tensor, loss_dsm: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """w = ||grad_W L_char|| / (||grad_W L_dsm|| + 1e-4), clamped to [0, max_weight] and detached, with W the
    student's output-layer weight (CharacteristicGenerator / CTM `calculate_adaptive_weight`; VQGAN's balancing rule).
    Both losses are unscaled here, so fp16 loss scaling does not enter the ratio. The gradients are fp32 even under fp16
    autocast because the networks run their output layer in fp32 (modelling/unet.py, mlp.py): through an fp16
    layer, the elementwise gradients of a loss averaged over a large batch underflow."""
    g_char = torch.autograd.grad(loss_char, last_layer, retain_graph=True)[0]
    g_dsm = torch.autograd.grad(loss_dsm, last_layer, retain_graph=True)[0]
    return (g_char.float().norm() / (g_dsm.float().norm() + 1e-4)).clamp(0, max_weight).detach()
