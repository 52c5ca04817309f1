"""Diffusion maths against closed forms: preconditioning, loss floors, and every solver on Gaussian data, where the
sampler is an affine map x = A·z + B of the latent and A, B are known exactly."""

import math

import pytest
import torch

import sample as sample_script
from losses import EDMLoss, FollmerLoss
from modelling import build_denoiser
from sampling.diffusion import SOLVERS, StackedNoise, sample, time_grid
from tests.gaussians import EDMMixture, FollmerMixture
from utils.cli import parse

TINY_UNET = dict(img_size=8, img_channels=1, model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])


def affine_map(denoiser, solver: str, num_steps: int, n: int = 64, **kw) -> tuple[float, float, int]:
    """(A, B, NFE) of the 1-D sampler map x = A·z + B, by least squares over n latents (exact for an affine map)."""
    x, nfe = sample(denoiser, StackedNoise(range(n)), solver=solver, num_steps=num_steps, device="cpu", **kw)
    z = StackedNoise(range(n)).randn(denoiser.sample_shape, "cpu")
    zc = z - z.mean()
    a = float((zc * (x - x.mean())).sum() / (zc**2).sum())
    return a, float(x.mean() - a * z.mean()), nfe


@pytest.mark.parametrize("method", ["edm", "follmer"])
def test_preconditioning_matches_the_formulas(method):
    torch.manual_seed(0)
    den = build_denoiser(method, net="ddpmpp", net_kwargs=TINY_UNET)
    s = den.sigma_data
    for t in (0.01, 0.5, 0.9 if method == "follmer" else 10.0):
        t_ = torch.tensor(t)
        c_skip, c_out, c_in = (float(c) for c in den.coefficients(t_))
        if method == "edm":  # EDM Table 1
            expected = (s**2 / (t**2 + s**2), t * s / math.sqrt(t**2 + s**2), 1 / math.sqrt(t**2 + s**2))
            assert float(den.c_noise(t_)) == pytest.approx(math.log(t) / 4)
            assert float(den.loss_weight(t_)) == pytest.approx((t**2 + s**2) / (t * s) ** 2)
        else:  # CharacteristicGenerator with sigma_data = 1: D = alpha·x + beta·F
            a, b = 1 - t, math.sqrt(t * (2 - t))
            expected = (a, b, 1.0)
            assert float(den.c_noise(t_)) == pytest.approx(999 * t)
            assert float(den.loss_weight(t_)) == pytest.approx(1 / b**2)
        assert (c_skip, c_out, c_in) == pytest.approx(expected, rel=1e-5)
    # At t -> 0 the denoiser returns its input, whatever the network says (its output layer is made O(1) first: the
    # U-Net initialises it near zero).
    torch.nn.init.normal_(den.net.out_conv.weight)
    x = torch.randn(3, 1, 8, 8)
    assert den.net(x, torch.zeros(3)).abs().mean() > 0.1
    # c_out -> 0 like sigma (EDM) or beta = sqrt(t(2 - t)) (Föllmer): the gap shrinks >= 30x from t = 1e-3 to 1e-8.
    with torch.no_grad():
        gaps = [float((den(x, t) - x).abs().max()) for t in (1e-3, 1e-8)]
    assert gaps[1] < gaps[0] / 30 and gaps[1] < 5e-3, gaps


class RecordingNet(torch.nn.Module):
    """Stands in for the network F: records what the preconditioning feeds it and returns a fixed nonlinear
    function of its input, so the test sees both the inputs (c_in·x, c_noise) and how the output is combined."""

    def __init__(self, two_time: bool = False):
        super().__init__()
        self.sample_shape, self.n_classes, self.two_time, self.calls = (3,), 0, two_time, []

    def forward(self, x, c_noise, labels=None, c_noise_s=None):
        self.calls.append((x.detach().double(), c_noise.detach().double(), c_noise_s))
        return torch.sin(3 * x) + 0.25


@pytest.mark.parametrize("method,sigma_data", [("edm", 0.5), ("edm", 1.3), ("follmer", 1.0), ("follmer", 0.6)])
@pytest.mark.parametrize("two_time", [False, True])
def test_denoiser_feeds_the_network_and_combines_its_output_as_the_papers_write(method, sigma_data, two_time):
    """D(x; t) = c_skip·x + c_out·F(c_in·x, c_noise(t)) with the coefficients written out here in float64: EDM
    Table 1 (sigma = t; c_noise = ln(sigma)/4) and CharacteristicGenerator's Föllmer preconditioning (EDM's recipe on
    x/alpha, alpha = 1 - t, beta = sqrt(t(2 - t)); c_noise = 999·t), including sigma_data != 1 where Föllmer's c_in is
    not 1, and the two-time networks' c_noise(s) (EDM: s = 0 embedded as sigma = 1e-4). Per-sample times."""
    den = build_denoiser(method, net="mlp", net_kwargs=dict(dim=3), sigma_data=sigma_data)
    den.net = RecordingNet(two_time)
    den.two_time = two_time
    t = [0.02, 0.4, 0.9] if method == "follmer" else [0.002, 0.5, 60.0]
    s = [0.0, 0.1, 0.5] if method == "follmer" else [0.0, 0.2, 10.0]
    x = torch.tensor([[0.3, -1.2, 2.0], [1.5, 0.1, -0.7], [-2.0, 0.8, 0.05]])
    out = den(x, torch.tensor(t), None, torch.tensor(s)) if two_time else den(x, torch.tensor(t))
    ((net_in, c_noise, c_noise_s),) = den.net.calls
    sd = sigma_data
    for i, ti in enumerate(t):
        a, b = (1.0, ti) if method == "edm" else (1 - ti, math.sqrt(ti * (2 - ti)))
        c_skip, c_out, c_in = (
            a * sd**2 / (a**2 * sd**2 + b**2),
            b * sd / math.hypot(a * sd, b),
            1 / math.hypot(a * sd, b),
        )
        noise = math.log(ti) / 4 if method == "edm" else 999 * ti
        x_i = x[i].double()
        assert torch.allclose(net_in[i], c_in * x_i, rtol=1e-6, atol=1e-7), (i, "c_in")
        assert float(c_noise[i]) == pytest.approx(noise, rel=1e-6), (i, "c_noise")
        expected = c_skip * x_i + c_out * (torch.sin(3 * c_in * x_i) + 0.25)
        assert torch.allclose(out[i].double(), expected, rtol=1e-5, atol=1e-6), (i, "c_skip, c_out")
        if two_time:
            noise_s = math.log(max(s[i], 1e-4)) / 4 if method == "edm" else 999 * s[i]
            assert float(c_noise_s[i]) == pytest.approx(noise_s, rel=1e-6, abs=1e-9), (i, "c_noise(s)")
        # lambda = (alpha² sd² + beta²)/(beta·sd)²; CharacteristicGenerator's code multiplies by sd² instead
        if method == "follmer":
            assert float(den.loss_weight(torch.tensor(ti))) == pytest.approx((a**2 * sd**2 + b**2) / (b * sd) ** 2)
        else:
            assert float(den.loss_weight(torch.tensor(ti))) == pytest.approx((ti**2 + sd**2) / (ti * sd) ** 2)


@pytest.mark.parametrize(
    "loss_fn",
    [
        EDMLoss(P_mean=math.log(0.01), P_std=0.0),
        EDMLoss(P_mean=math.log(0.5), P_std=0.0),
        EDMLoss(P_mean=math.log(10.0), P_std=0.0),
        FollmerLoss(),
    ],
)
def test_ideal_denoiser_loss_is_one_per_element(loss_fn):
    """T2: for data N(0, sigma_data²) the exact posterior mean has lambda(t)·MMSE = 1 per element at every t, so the
    EDM loss (per-image sum over d = 64 elements) is 64 and the Föllmer loss (per-element mean) is 1."""
    torch.manual_seed(0)
    d, n = 64, 4000
    if isinstance(loss_fn, EDMLoss):
        den, per_sample_scale = EDMMixture([[0.0] * d], [0.5]), d
    else:
        den, per_sample_scale = FollmerMixture([[0.0] * d], [1.0]), 1
    images = den.sigma_data * torch.randn(n, d, dtype=torch.float64)
    loss = loss_fn(den, images).mean() / per_sample_scale
    # Each per-sample term is a mean of d chi-square(1) variables: the batch mean has std sqrt(2 / (n d)) = 0.0028.
    assert float(loss) == pytest.approx(1.0, abs=0.015)


def test_time_grid_endpoints_and_rho():
    grid = time_grid(80.0, 0.002, 18, 7.0)
    assert grid[0] == pytest.approx(80) and grid[-1] == pytest.approx(0.002) and len(grid) == 18
    assert all(a > b for a, b in zip(grid[:-1], grid[1:], strict=True))
    assert time_grid(0.999, 0.001, 5, 1.0) == pytest.approx([0.999, 0.7495, 0.5, 0.2505, 0.001])


def test_edm_heun_reproduces_the_published_algorithm():
    """T3 (EDM Algorithm 2, sigma in [0.002, 80], rho 7, exact D for N(1, 0.5²)): A and B at N = 5, 18, 35, 64
    match the reference implementation to 5 digits, with NFE = 2N - 1."""
    den = EDMMixture([[1.0]], [0.5])
    table = {5: (1.25789, 0.98428), 18: (0.52763, 0.99341), 35: (0.50647, 0.99367), 64: (0.50182, 0.99373)}
    for n_steps, (a_ref, b_ref) in table.items():
        a, b, nfe = affine_map(den, "heun", n_steps)
        assert (a, b) == pytest.approx((a_ref, b_ref), abs=2e-5)
        assert nfe == 2 * n_steps - 1


def test_follmer_solvers_match_the_reference_tables():
    """T4 (grid linspace(0.999, 0.001, N), bridge +mean, final denoise; mu = 0.5)."""
    exact = FollmerMixture([[0.5]], [1.0])  # s = 1: v = -mu is constant, Euler and Heun are exact at any N
    for solver in ("euler", "heun"):
        for n_steps in (2, 5, 20):
            assert affine_map(exact, solver, n_steps)[:2] == pytest.approx((0.999, 0.5), abs=1e-6)
    for n_steps, a_ref in {2: 0.0457, 5: 0.6879, 20: 0.9149}.items():
        assert affine_map(exact, "deis", n_steps)[0] == pytest.approx(a_ref, abs=1e-4)
    sharp = FollmerMixture([[0.5]], [0.2])
    table = {
        "euler": {2: 0.9524, 5: 0.4587, 20: 0.2610},
        "heun": {2: -9.92, 5: -0.585, 20: 0.1517},
        "deis": {2: 0.0427, 5: 0.0829, 20: 0.1307},
    }
    for solver, row in table.items():
        for n_steps, a_ref in row.items():
            a, b, nfe = affine_map(sharp, solver, n_steps)
            assert a == pytest.approx(a_ref, rel=2e-3)
            assert b == pytest.approx(0.5, abs=1e-6)
            assert nfe == (2 * n_steps - 1 if solver == "heun" else n_steps)
    # DEIS is exact for a point mass at any N: every step lands on mu.
    point = FollmerMixture([[0.5]], [0.0])
    for n_steps in (1, 2, 7):
        x, _ = sample(point, StackedNoise(range(16)), solver="deis", num_steps=n_steps, device="cpu")
        assert torch.allclose(x, torch.full_like(x, 0.5), atol=1e-12)


@pytest.mark.parametrize("method", ["edm", "follmer"])
def test_solvers_converge_at_their_order(method):
    """Error of A against the converged map (exact flow to t_min, then the final denoise) as N doubles: Euler
    halves it (order 1), Heun quarters it (order 2). Measured log2 ratios: Euler 0.98-1.03, Heun 2.05-2.2."""
    s = 0.5 if method == "edm" else 0.2
    den = EDMMixture([[1.0]], [s]) if method == "edm" else FollmerMixture([[0.5]], [s])
    t_min, t_max = den.t_min, den.t_max

    def spread(t):  # std of x_t for N(mu, s²) data
        return math.sqrt(float(den.alpha(t)) ** 2 * s**2 + float(den.beta(t)) ** 2)

    prior_std = t_max if method == "edm" else 1.0  # the sampler starts from N(., prior_std²)
    a_exact = prior_std * spread(t_min) / spread(t_max) * float(den.alpha(t_min)) * s**2 / spread(t_min) ** 2
    for solver, order in (("euler", 1), ("heun", 2)):
        errors = [abs(affine_map(den, solver, n)[0] - a_exact) for n in (32, 64, 128)]
        rates = [math.log2(e0 / e1) for e0, e1 in zip(errors[:-1], errors[1:], strict=True)]
        assert all(order - 0.15 < r < order + 0.25 for r in rates), (solver, errors, rates)


GMM_MEANS = [[3 * math.cos(-2 * math.pi * k / 5), 3 * math.sin(-2 * math.pi * k / 5)] for k in range(5)]


@pytest.mark.parametrize("method", ["edm", "follmer"])
@pytest.mark.parametrize("solver,n_steps", [("euler", 100), ("heun", 18), ("deis", 50), ("ancestral", 100)])
def test_every_solver_reproduces_mixture_moments(method, solver, n_steps):
    """GPM's 5-Gaussian mixture (std 0.5, radius 3) with the exact mixture denoiser: the sample mean and covariance
    match the mixture's. Tolerance: 5 standard errors of the 2000-sample estimate (mean SE = sqrt(4.75/2000) =
    0.049; variance SE ~ 4.75·sqrt(2/2000) = 0.15 before the mixture's excess kurtosis) plus the discretisation
    and final-denoise bias, which these step counts keep below 0.1."""
    cls = EDMMixture if method == "edm" else FollmerMixture
    den = cls(GMM_MEANS, [0.5])
    x, _ = sample(den, StackedNoise(range(2000)), solver=solver, num_steps=n_steps, device="cpu")
    mean, cov = den.moments()
    assert (x.mean(0) - mean).abs().max() < 0.25
    assert (torch.cov(x.T) - cov).abs().max() < 0.8
    # Mode balance: each mode holds 20 % of the samples (binomial SE 0.009; 5 SE).
    nearest = torch.cdist(x, torch.tensor(GMM_MEANS, dtype=torch.float64)).argmin(1)
    assert (torch.bincount(nearest, minlength=5) / len(x) - 0.2).abs().max() < 0.045


def noise_coefficients(denoiser, n_draws: int, seeds=range(48), **kw) -> torch.Tensor:
    """The 1-D sampler's output as an affine function of all its noise draws, (c_1, ..., c_n, intercept): draw 1 is
    the latent, draws 2..n the later ones (churn or ancestral noise), replayed from each image's own generator in
    the order the sampler draws them. Least squares over the seeds, exact (residual ~1e-15) when the sampler is
    affine in exactly these draws, as it is on 1-D Gaussian data with the exact denoiser."""
    x, _ = sample(denoiser, StackedNoise(seeds), device="cpu", **kw)
    rows = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        rows.append([float(torch.randn(1, generator=generator)) for _ in range(n_draws)] + [1.0])
    design = torch.tensor(rows, dtype=torch.float64)
    coef = torch.linalg.lstsq(design, x).solution[:, 0]
    assert float((design @ coef - x[:, 0]).abs().max()) < 1e-10, "not affine in exactly these draws"
    return coef


class Affine:
    """x = sum_k c_k·draw_k + c_0 over independent N(0, 1) draws: the exact law of a 1-D sampler's state on Gaussian
    data, propagated through the reference algorithms below (written from the papers, independently of
    sampling/diffusion.py)."""

    def __init__(self, coef):
        self.coef = torch.as_tensor(coef, dtype=torch.float64)

    def __add__(self, other):
        return Affine(self.coef + (other.coef if isinstance(other, Affine) else torch.zeros_like(self.coef)))

    def __sub__(self, other):
        return self + other * -1.0

    def __mul__(self, k: float):
        return Affine(self.coef * k)

    __rmul__ = __mul__

    def shift(self, b: float):  # x + b
        return Affine(torch.cat([self.coef[:-1], self.coef[-1:] + b]))

    def noise(self, k: int, std: float):  # x + std·draw_k
        coef = self.coef.clone()
        coef[k] += std
        return Affine(coef)

    @property
    def variance(self) -> float:
        return float((self.coef[:-1] ** 2).sum())


def gaussian_denoiser(x: Affine, alpha: float, beta: float, mu: float, s: float) -> Affine:
    """E[x0 | x_t = x] for x0 ~ N(mu, s²), x_t = alpha·x0 + beta·z: mu + alpha·s²/(alpha²s² + beta²)·(x - alpha·mu)."""
    return (x.shift(-alpha * mu) * (alpha * s**2 / (alpha**2 * s**2 + beta**2))).shift(mu)


def karras_grid(t_max: float, t_min: float, n: int, rho: float) -> list[float]:
    """EDM Eq. 5 in plain Python floats."""
    return [(t_max ** (1 / rho) + i / (n - 1) * (t_min ** (1 / rho) - t_max ** (1 / rho))) ** rho for i in range(n)]


def edm_algorithm_2(mu, s, n, s_churn, s_tmin, s_tmax, s_noise, n_draws) -> Affine:
    """EDM Algorithm 2 (Heun with churn) from the paper, sigma in [0.002, 80], rho 7, on N(mu, s²) data."""
    sigmas, x, k = karras_grid(80.0, 0.002, n, 7.0) + [0.0], Affine([80.0] + [0.0] * n_draws), 1
    for i in range(n):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= t_cur <= s_tmax else 0.0
        t_hat = t_cur * (1 + gamma)
        if gamma > 0:
            x, k = x.noise(k, math.sqrt(t_hat**2 - t_cur**2) * s_noise), k + 1
        d_cur = (x - gaussian_denoiser(x, 1.0, t_hat, mu, s)) * (1 / t_hat)
        x_next = x + d_cur * (t_next - t_hat)
        if i < n - 1:
            d_next = (x_next - gaussian_denoiser(x_next, 1.0, t_next, mu, s)) * (1 / t_next)
            x_next = x + (d_cur + d_next) * ((t_next - t_hat) / 2)
        x = x_next
    assert k == n_draws
    return x


def test_edm_churn_is_exactly_algorithm_2():
    """EDM Algorithm 2 with the CIFAR-10 VP stochastic setting typed as EDM publishes it (sample.py --S_churn 30
    --S_min 0.01 --S_max 1 --S_noise 1.007, N = 18: gamma = min(30/18, sqrt 2 - 1), five churned steps) on N(1, 0.5²)
    with the exact denoiser: the output's coefficient on the latent and on each churn draw equals the reference's
    to 1e-9, so its variance is exact: std 0.5453 (EDM's reference code measured 0.544 ± 0.006 on 4000 samples),
    against 0.5276 without churn (T3's A at N = 18), which the old 0.544 ± 0.02 bound also accepted."""
    den = EDMMixture([[1.0]], [0.5])
    flags = ["--num_steps", "18", "--S_churn", "30", "--S_min", "0.01", "--S_max", "1", "--S_noise", "1.007"]
    settings = sample_script.solver_settings(den, parse(sample_script.Config, flags))
    reference = edm_algorithm_2(1.0, 0.5, 18, 30.0, 0.01, 1.0, 1.007, n_draws=6)
    coef = noise_coefficients(den, 6, **settings)
    assert torch.allclose(coef, reference.coef, rtol=1e-9, atol=1e-12), (coef, reference.coef)
    deterministic = edm_algorithm_2(1.0, 0.5, 18, 0.0, 0.01, 1.0, 1.007, n_draws=1)
    assert torch.allclose(noise_coefficients(den, 1, solver="heun", num_steps=18), deterministic.coef, rtol=1e-9)
    assert math.sqrt(reference.variance) == pytest.approx(0.5453, abs=1e-4)
    assert math.sqrt(deterministic.variance) == pytest.approx(0.5276, abs=1e-4)
    # The final step churns too when sigma_min is inside [S_min, S_max] (Algorithm 2 churns at every i < N): here
    # only the last of two steps, sigma = 0.002, is in [0, 1].
    final = edm_algorithm_2(1.0, 0.5, 2, 0.6, 0.0, 1.0, 1.0, n_draws=2)
    coef = noise_coefficients(den, 2, solver="heun", num_steps=2, churn=True, gamma=0.3, s_min=0.0, s_max=1.0)
    assert torch.allclose(coef, final.coef, rtol=1e-9, atol=1e-12)


def follmer_reference(mu, s, n, solver, churn=None, s_noise=1.0, n_draws=1) -> Affine:
    """CharacteristicGenerator's samplers (its eval.py `ode_sampler`) on N(mu, s²) with the exact denoiser: t from
    0.999 to 1e-3 (rho 1), bridge x = z + 0.001·mu, then n - 1 steps, each after an optional churn (gamma, s_min,
    s_max): t' = t(1 + gamma), r = (1 - t')/(1 - t), x <- r·x + sqrt(1 - r²)·s_noise·eps (CharacteristicGenerator's
    churn_noise); then x <- D(x; t_min). deis: x' = (beta'/beta)·x + (alpha' - alpha·beta'/beta)·D. ancestral:
    x' ~ q(x_t' | x_t = x, x0 = D), by conditioning the joint Gaussian of (x_t', x_t) given x0: mean
    alpha'·D + (c/beta²)·(x - alpha·D) and variance beta'² - c²/beta²,
    with c = Cov(x_t', x_t | x0) = (alpha/alpha')·beta'²."""
    alpha = lambda t: 1 - t  # noqa: E731
    beta = lambda t: math.sqrt(t * (2 - t))  # noqa: E731
    grid, k = karras_grid(0.999, 1e-3, n, 1.0), 1
    x = Affine([1.0] + [0.0] * n_draws).shift(0.001 * mu)
    for t, t_next in zip(grid[:-1], grid[1:], strict=True):
        if churn is not None and churn[1] <= t <= churn[2]:
            t_hat = t * (1 + churn[0])
            r = (1 - t_hat) / (1 - t)
            x, k, t = (x * r).noise(k, math.sqrt(1 - r**2) * s_noise), k + 1, t_hat
        d = gaussian_denoiser(x, alpha(t), beta(t), mu, s)
        if solver == "deis":
            ratio = beta(t_next) / beta(t)
            x = x * ratio + d * (alpha(t_next) - alpha(t) * ratio)
        else:
            c = alpha(t) / alpha(t_next) * beta(t_next) ** 2
            mean = d * alpha(t_next) + (x - d * alpha(t)) * (c / beta(t) ** 2)
            x, k = mean.noise(k, math.sqrt(beta(t_next) ** 2 - c**2 / beta(t) ** 2) * s_noise), k + 1
    assert k == n_draws
    return gaussian_denoiser(x, alpha(grid[-1]), beta(grid[-1]), mu, s)


def test_follmer_churn_and_ancestral_steps_are_exact():
    """CharacteristicGenerator's churn (gamma 0.2 on [0.05, 0.6], 10-point DEIS grid: churn at 0.5, 0.389, 0.278, 0.167,
    0.056) and the ancestral sampler's posterior mean and std, on N(0.5, 0.3²) with the exact denoiser: every
    coefficient of the output on the latent and on each later draw equals the reference's to 1e-9."""
    den = FollmerMixture([[0.5]], [0.3])
    reference = follmer_reference(0.5, 0.3, 10, "deis", churn=(0.2, 0.05, 0.6), s_noise=1.003, n_draws=6)
    coef = noise_coefficients(den, 6, solver="deis", num_steps=10, churn=True, gamma=0.2, s_noise=1.003)
    assert torch.allclose(coef, reference.coef, rtol=1e-9, atol=1e-12), (coef, reference.coef)
    assert abs(reference.variance / follmer_reference(0.5, 0.3, 10, "deis").variance - 1) > 0.1  # churn matters
    reference = follmer_reference(0.5, 0.3, 8, "ancestral", s_noise=1.003, n_draws=8)
    coef = noise_coefficients(den, 8, solver="ancestral", num_steps=8, s_noise=1.003)
    assert torch.allclose(coef, reference.coef, rtol=1e-9, atol=1e-12), (coef, reference.coef)


def test_edm_ancestral_step_is_the_gaussian_posterior():
    """The ancestral sampler on EDM's grid (alpha = 1, beta = sigma; N = 6), N(1, 0.5²), exact denoiser: every
    draw's coefficient matches the Gaussian-conditioning reference (posterior std sigma'·sqrt(sigma² -
    sigma'²)/sigma)."""
    den = EDMMixture([[1.0]], [0.5])
    sigmas, x, k = karras_grid(80.0, 0.002, 6, 7.0), Affine([80.0] + [0.0] * 6), 1
    for t, t_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        d = gaussian_denoiser(x, 1.0, t, 1.0, 0.5)
        c = t_next**2  # Cov(x_t', x_t | x0) with x_t = x_t' + sqrt(t² - t'²)·n
        mean = d + (x - d) * (c / t**2)
        x, k = mean.noise(k, math.sqrt(t_next**2 - c**2 / t**2)), k + 1
    reference = gaussian_denoiser(x, 1.0, sigmas[-1], 1.0, 0.5)
    coef = noise_coefficients(den, 6, solver="ancestral", num_steps=6)
    assert torch.allclose(coef, reference.coef, rtol=1e-9, atol=1e-12), (coef, reference.coef)


@pytest.mark.parametrize("solver", [s for s in SOLVERS if s != "characteristic"])
def test_samples_do_not_depend_on_the_batch(solver):
    """T8: per-image generators; churn and ancestral noise included. Seeds 0-15 as one batch == as four."""
    den = FollmerMixture(GMM_MEANS, [0.5])
    kw = dict(solver=solver, num_steps=6, device="cpu", churn=True, gamma=0.2)
    whole, _ = sample(den, StackedNoise(range(16)), **kw)
    parts = torch.cat([sample(den, StackedNoise(range(i, i + 4)), **kw)[0] for i in range(0, 16, 4)])
    assert torch.equal(whole, parts)
