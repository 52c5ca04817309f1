"""ODE and SDE samplers for any denoiser of modelling/precond.py, i.e. any schedule x_t = alpha(t)·x0 + beta(t)·z.

With D the denoiser (posterior mean of x0), z_hat = (x - alpha·D)/beta, and the probability-flow ODE velocity
    v(x, t) = alpha'(t)·D + beta'(t)·z_hat
which is (x - D)/sigma for EDM (EDM Eq. 4 with sigma(t) = t) and (alpha·x - D)/beta² for Föllmer
(CharacteristicGenerator). Time grid (EDM Eq. 5, also CharacteristicGenerator's "Karras grid" in t):
t_i = (t_max^(1/rho) + i/(N-1)·(t_min^(1/rho) - t_max^(1/rho)))^rho, i = 0..N-1; N - 1 solver steps from t_max to
t_min, then a final denoising step x <- D(x; t_min). For EDM that final step is exactly EDM Algorithm 2's last Euler
step to sigma = 0; for Föllmer it is exactly the DEIS step to t = 0 (beta_0 = 0). Solvers:
  euler      x + v·dt                                                     NFE N
  heun       EDM Algorithm 2 (2nd order; the correction is skipped only on the final step)   NFE 2N - 1
  deis       first-order exponential integrator = DDIM: x' = r·x + (alpha' - r·alpha)·D, r = beta'/beta   NFE N
  ancestral  the reverse SDE's first-order exponential integrator: draw x' from q(x_t' | x_t, x0 = D), DDPM's
             ancestral step (stochastic; stable near t = 1, where Euler-Maruyama on the Föllmer SDE is not)  NFE N
  characteristic  two-time (distilled) networks only: jump with the flow map x' = G(x, t, t') and finish with
             G(x, t_min, 0) (CharacteristicGenerator's sampler; N = 1 is the one-step generator G(x, t_max, 0))  NFE N
Churn (EDM Algorithm 2's S_churn, CharacteristicGenerator's noise mollification; gamma is per step and not capped, EDM's
gamma_i = min(S_churn/N, sqrt(2) - 1) is one choice): for t_i in [s_min, s_max], final step included, first move to
t_hat = t_i·(1 + gamma) with the exact forward transition x <- (alpha_hat/alpha)·x + sqrt(beta_hat² -
(alpha_hat/alpha)²·beta²)·s_noise·eps (EDM: x + sqrt(sigma_hat² - sigma²)·S_noise·eps), then step from t_hat.
State and grid are float64 (the denoiser computes in fp32); every image draws its noise from its own generator, so
outputs do not depend on the batch size or the number of processes.
"""

import math

import torch

from modelling.precond import as_time, flow_map

SOLVERS = ("euler", "heun", "deis", "ancestral", "characteristic")
ODE_SOLVERS = ("euler", "heun", "deis")  # deterministic one-time solvers (`ode_step`)


def ode_step(denoise, schedule, x: torch.Tensor, t, t_next, solver: str) -> torch.Tensor:
    """One euler/heun/deis step of the probability-flow ODE from t to t_next, both scalars or per-sample (B,)
    tensors (the distillation teacher starts every sample at its own time). `denoise(x, t)` returns D(x; t)."""
    shape = (-1, *[1] * (x.ndim - 1))

    def coef(fn, time):
        return fn(as_time(time).to(x.device)).reshape(shape).to(x.dtype)

    def velocity(x, time):
        d = denoise(x, time)
        return coef(schedule.dalpha, time) * d + coef(schedule.dbeta, time) * (x - coef(schedule.alpha, time) * d) / (
            coef(schedule.beta, time)
        )

    dt = (as_time(t_next) - as_time(t)).to(x.device).reshape(shape).to(x.dtype)
    if solver == "euler":
        return x + velocity(x, t) * dt
    if solver == "heun":
        v_cur = velocity(x, t)
        return x + (v_cur + velocity(x + v_cur * dt, t_next)) * (dt / 2)
    if solver == "deis":
        return flow_map(schedule, x, t, t_next, denoise(x, t))
    raise ValueError(f"unknown ODE solver {solver!r}; valid: {list(ODE_SOLVERS)}")


def time_grid(t_max: float, t_min: float, num_steps: int, rho: float) -> list[float]:
    """N decreasing times from t_max to t_min (float64 math, returned as Python floats)."""
    if num_steps == 1:
        return [t_max]
    i = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
    grid = (t_max ** (1 / rho) + i * (t_min ** (1 / rho) - t_max ** (1 / rho))) ** rho
    return grid.tolist()


GRID_KEYS = ("t_min", "t_max", "rho")


def use_distilled_grid(denoiser, meta: dict):
    """Make the time grid a characteristic (distilled) snapshot was trained on its sampling default: the student
    learned its flow map on that grid's times, not on the family's class defaults. distill_characteristic.py
    records the resolved t_min/t_max/rho in the snapshot's extra["grid"]; older snapshots hold only the flags in
    their config (None there means the family default, which the class already has). Explicit sampler arguments
    still win, as for any default."""
    grid = meta.get("extra", {}).get("grid") or {k: meta.get("config", {}).get(k) for k in GRID_KEYS}
    for key in GRID_KEYS:
        if grid.get(key) is not None:
            setattr(denoiser, key, float(grid[key]))  # an instance attribute shadows the class default
    return denoiser


class StackedNoise:
    """One torch.Generator per image, seeded by that image's seed (EDM's StackedRandomGenerator contract)."""

    def __init__(self, seeds: list[int]):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def randn(self, shape: tuple[int, ...], device) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators]).to(device, torch.float64)


@torch.no_grad()
def sample(
    denoiser,
    noise: StackedNoise,
    labels: torch.Tensor | None = None,
    solver: str | None = None,
    num_steps: int = 18,
    rho: float | None = None,
    t_min: float | None = None,
    t_max: float | None = None,
    churn: bool = False,
    gamma: float = 0.1,
    s_min: float | None = None,
    s_max: float | None = None,
    s_noise: float = 1.0,
    device=None,
) -> tuple[torch.Tensor, int]:
    """Run one solver from the prior to data; returns (float64 samples, number of network evaluations)."""
    solver = solver or denoiser.solver
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; valid: {list(SOLVERS)}")
    if (solver == "characteristic") != getattr(denoiser, "two_time", False):
        raise ValueError("the characteristic solver needs a two-time network, and two-time networks need it")
    rho = denoiser.rho if rho is None else rho
    t_min = denoiser.t_min if t_min is None else t_min
    t_max = denoiser.t_max if t_max is None else t_max
    s_min = denoiser.churn_range[0] if s_min is None else s_min
    s_max = denoiser.churn_range[1] if s_max is None else s_max
    if not 0 < t_min < t_max < denoiser.t_limit:
        raise ValueError(f"need 0 < t_min < t_max < {denoiser.t_limit}, got t_min {t_min}, t_max {t_max}")
    device = device or next(denoiser.parameters()).device
    nfe = 0

    def denoise(x, t, s=None):
        nonlocal nfe
        nfe += 1
        return (denoiser(x, t, labels) if s is None else denoiser(x, t, labels, s)).double()

    def churn_at(x, t):
        """EDM Algorithm 2 lines 5-6: move forward to t_hat = t·(1 + gamma) with the exact forward transition."""
        if not (churn and gamma > 0 and s_min <= t <= s_max):
            return x, t
        # EDM's sigma is unbounded; Föllmer's t must stay below 1, so it stops at t_max.
        t_hat = t * (1 + gamma) if denoiser.t_limit == math.inf else min(t * (1 + gamma), t_max)
        ratio = float(denoiser.alpha(t_hat)) / float(denoiser.alpha(t))
        var = float(denoiser.beta(t_hat)) ** 2 - ratio**2 * float(denoiser.beta(t)) ** 2
        return ratio * x + math.sqrt(max(var, 0.0)) * s_noise * noise.randn(denoiser.sample_shape, device), t_hat

    x = denoiser.prior(noise.randn(denoiser.sample_shape, device), labels, t_max)
    grid = time_grid(t_max, t_min, num_steps, rho)
    for t_cur, t_next in zip(grid[:-1], grid[1:], strict=True):
        x, t_cur = churn_at(x, t_cur)
        if solver in ODE_SOLVERS:
            x = ode_step(denoise, denoiser, x, t_cur, t_next, solver)
        elif solver == "characteristic":
            x = flow_map(denoiser, x, t_cur, t_next, denoise(x, t_cur, t_next))
        else:  # ancestral: the Gaussian posterior q(x_next | x_cur, x0 = d)
            a_cur, b_cur = float(denoiser.alpha(t_cur)), float(denoiser.beta(t_cur))
            a_next, b_next = float(denoiser.alpha(t_next)), float(denoiser.beta(t_next))
            d = denoise(x, t_cur)
            a_step = a_cur / a_next  # alpha of the forward transition t_next -> t_cur
            var_step = b_cur**2 - a_step**2 * b_next**2
            mean = (a_step * b_next**2 / b_cur**2) * x + (a_next * var_step / b_cur**2) * d
            std = math.sqrt(max(var_step, 0.0)) * b_next / b_cur
            x = mean + std * s_noise * noise.randn(denoiser.sample_shape, device)
    # Final step to t = 0: the denoiser's output at t_min (EDM's last Euler step, churned like every step;
    # Föllmer's DEIS step; for a characteristic generator G(x, t_min, 0) = D(x, t_min, 0)).
    x, t_last = churn_at(x, grid[-1])
    return denoise(x, t_last, 0.0 if solver == "characteristic" else None), nfe
