# Denoiser preconditioning: D(x; t) = c_skip(t)·x + c_out(t)·F(c_in(t)·x, c_noise(t)) around any network F.
# EDM: Karras et al. 2022, arXiv 2206.00364, Table 1 / Sec. 5 ("EDMPrecond"), noise x = y + sigma·n, t = sigma.
# Föllmer: Ding et al. 2024, arXiv 2405.05512 (CharacteristicGenerator's sde.py): the
# variance-preserving interpolant x_t = (1 - t)·x0 + sqrt(t(2 - t))·z, data at t = 0 and noise at t = 1.
# Both are one formula for x_t = alpha(t)·x0 + beta(t)·z with data std sigma_data (EDM's recipe applied to x/alpha):
#   c_in = 1/sqrt(a²s² + b²), c_out = b·s/sqrt(a²s² + b²), c_skip = a·s²/(a²s² + b²), loss weight (a²s² + b²)/(b s)²
# which for EDM (a = 1, b = sigma) is exactly EDM's table. The wrapper computes in fp32 whatever autocast says;
# only the network F may run in reduced precision. The schedule methods (alpha, beta and their t-derivatives)
# are what the samplers in sampling/diffusion.py integrate, so one sampler serves both.
# Characteristic generators (the Characteristic Learning paper, Ding et al. 2024, Sec. 2.5): the same denoiser around
# a two-time network, D(x, t, s) = c_skip(t)·x + c_out(t)·F(c_in(t)·x, c_noise(t), c_noise(s)), and the flow map from
# t to s <= t
#   G(x, t, s) = (beta_s/beta_t)·x + (alpha_s - alpha_t·beta_s/beta_t)·D(x, t, s)      (`flow_map`)
# a DDIM step whose denoiser knows where the step lands. G(x, t, t) = x and G(x, t, 0) = D(x, t, 0) exactly.

import math

import torch
from torch import nn


def as_time(t) -> torch.Tensor:
    """Tensors keep their dtype (fp32 in training); Python numbers (the samplers' float64 grid) stay float64."""
    return t if isinstance(t, torch.Tensor) else torch.tensor(t, dtype=torch.float64)


class Denoiser(nn.Module):
    # Sampling defaults, overridden per family: time range, grid exponent and solver.
    t_min, t_max, rho, solver = 0.0, 1.0, 1.0, "heun"
    churn_range = (0.0, math.inf)  # default [s_min, s_max] of the stochastic "churn"
    t_limit = math.inf  # times must stay below this (Föllmer: 1, where the SDE and c_in degenerate)

    def __init__(self, net: nn.Module, sigma_data: float):
        super().__init__()
        self.net, self.sigma_data = net, sigma_data
        self.n_classes, self.sample_shape = net.n_classes, tuple(net.sample_shape)
        self.two_time = getattr(net, "two_time", False)
        if self.two_time:
            self.solver = "characteristic"  # a chain of flow-map jumps (sampling/diffusion.py)

    def alpha(self, t):
        raise NotImplementedError

    def beta(self, t):
        raise NotImplementedError

    def dalpha(self, t):
        raise NotImplementedError

    def dbeta(self, t):
        raise NotImplementedError

    def c_noise(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def c_noise_s(self, s: torch.Tensor) -> torch.Tensor:
        """The target time's network input; s may be 0 (the data end)."""
        return self.c_noise(s)

    def prior(self, latents: torch.Tensor, labels: torch.Tensor | None, t_max: float) -> torch.Tensor:
        """x at t_max from standard-normal latents."""
        raise NotImplementedError

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, b, s = self.alpha(t), self.beta(t), self.sigma_data
        denom = a**2 * s**2 + b**2
        return a * s**2 / denom, b * s / denom.sqrt(), 1 / denom.sqrt()  # c_skip, c_out, c_in

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """lambda(t) that makes the preconditioned target of F unit-variance (EDM Eq. 8 / Table 1)."""
        a, b, s = self.alpha(t), self.beta(t), self.sigma_data
        return (a**2 * s**2 + b**2) / (b * s) ** 2

    def forward(self, x: torch.Tensor, t, labels: torch.Tensor | None = None, s=None) -> torch.Tensor:
        """D(x; t), or D(x, t, s) for a two-time network (s defaults to t: the plain denoiser, CharacteristicGenerator's
        DSM term)."""
        x = x.float()
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(x.shape[0])  # (B,)
        c_skip, c_out, c_in = (c.reshape(-1, *[1] * (x.ndim - 1)) for c in self.coefficients(t))
        if self.two_time:
            s = t if s is None else torch.as_tensor(s, dtype=torch.float32, device=x.device).expand(x.shape[0])
            out = self.net(c_in * x, self.c_noise(t), labels, self.c_noise_s(s))
        elif s is not None:
            raise ValueError("this denoiser has one time input; a target time s needs a two-time network")
        else:
            out = self.net(c_in * x, self.c_noise(t), labels)
        return c_skip * x + c_out * out.float()


def flow_map(schedule: Denoiser, x: torch.Tensor, t, s, denoised: torch.Tensor) -> torch.Tensor:
    """G(x, t, s) = (beta_s/beta_t)·x + (alpha_s - alpha_t·beta_s/beta_t)·D, for scalar or per-sample (B,) times:
    the DDIM/DEIS step from t to s with the denoiser output `denoised` (CharacteristicGenerator's characteristic
    parametrisation)."""
    shape = (-1, *[1] * (x.ndim - 1))
    t, s = as_time(t).to(x.device), as_time(s).to(x.device)
    ratio = (schedule.beta(s) / schedule.beta(t)).reshape(shape).to(x.dtype)
    alpha_t, alpha_s = schedule.alpha(t).reshape(shape).to(x.dtype), schedule.alpha(s).reshape(shape).to(x.dtype)
    return ratio * x + (alpha_s - ratio * alpha_t) * denoised.to(x.dtype)


class EDMDenoiser(Denoiser):
    """t = sigma; x = y + sigma·n (alpha = 1, beta = sigma); c_noise = ln(sigma)/4; sigma_data 0.5."""

    t_min, t_max, rho, solver = 0.002, 80.0, 7.0, "heun"

    def __init__(self, net: nn.Module, sigma_data: float = 0.5):
        super().__init__(net, sigma_data)

    def alpha(self, t):
        return torch.ones_like(as_time(t))

    def beta(self, t):
        return as_time(t)

    def dalpha(self, t):
        return torch.zeros_like(as_time(t))

    def dbeta(self, t):
        return torch.ones_like(as_time(t))

    def c_noise(self, t):
        return t.log() / 4

    def c_noise_s(self, s):
        # ln(0) is -inf: the data end s = 0 is embedded as sigma = 1e-4, below any sigma the samplers visit.
        return s.clamp(min=1e-4).log() / 4

    def prior(self, latents, labels, t_max):
        return latents * t_max  # N(0, sigma_max² I): the data is negligible next to sigma_max = 80


class FollmerDenoiser(Denoiser):
    """alpha = 1 - t, beta = sqrt(t(2 - t)); c_noise = M·t with M = 999; sigma_data 1 (then F predicts
    beta·x0 - alpha·z, "v-prediction"). `data_mean` (per class for conditional models) is the training set's mean,
    needed for the exact first step from t = 1, where the ODE velocity is -E[x0 | class] whatever x is."""

    t_min, t_max, rho, solver = 1e-3, 1 - 1e-3, 1.0, "deis"
    churn_range, t_limit = (0.05, 0.6), 1.0

    def __init__(self, net: nn.Module, sigma_data: float = 1.0, noise_scale: float = 999.0):
        super().__init__(net, sigma_data)
        self.noise_scale = noise_scale
        self.register_buffer("data_mean", torch.zeros(max(self.n_classes, 1), *self.sample_shape))

    def alpha(self, t):
        return 1 - as_time(t)

    def beta(self, t):
        t = as_time(t)
        return (t * (2 - t)).sqrt()

    def dalpha(self, t):
        return -torch.ones_like(as_time(t))

    def dbeta(self, t):
        return (1 - as_time(t)) / self.beta(t)

    def c_noise(self, t):
        return self.noise_scale * t

    def prior(self, latents, labels, t_max):
        # x_{t_max} = z + (1 - t_max)·E[x0]: one exact Euler step of dx/dt = -E[x0] from t = 1.
        # (CharacteristicGenerator's code subtracts this term; the derivation adds it.)
        mean = self.data_mean[labels] if labels is not None and self.n_classes else self.data_mean[:1]
        return latents + (1 - t_max) * mean.to(latents.dtype)
