"""Latent MCMC samplers (sampling/latent_mcmc.py) against closed forms: each on a
correlated 2-D Gaussian and a Gaussian mixture, exact invariance of the Metropolis samplers, ULA's and underdamped
Langevin's exact stationary laws for their discretisations, the temperature's effect, and per-seed chains that do
not depend on their batch. Everything runs in float64 with fixed seeds, so the numbers are reproducible."""

import math

import pytest
import torch
from torch import nn

from modelling import build_gebm
from sampling import seed_latents
from sampling.latent_mcmc import SAMPLERS, LatentChains, gebm_images, latent_potential

MU = torch.tensor([1.0, -2.0], dtype=torch.float64)
SIGMA = torch.tensor([[2.0, 0.8], [0.8, 1.0]], dtype=torch.float64)
PRECISION = torch.linalg.inv(SIGMA)


class BatchNoise:
    """The chains' noise from one generator for the whole batch: the same contract as ChainNoise, and fast for
    10^4-10^5 chains."""

    def __init__(self, n: int, seed: int):
        self.n, self.generator = n, torch.Generator().manual_seed(seed)

    def randn(self, dim, device=None, dtype=torch.float64):
        return torch.randn(self.n, dim, generator=self.generator, dtype=torch.float64)

    def rand(self, device=None):
        return torch.rand(self.n, generator=self.generator, dtype=torch.float64)


def gaussian_potential(zs):
    y = zs - MU
    return 0.5 * ((y @ PRECISION) * y).sum(dim=1)


def gaussian_samples(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return MU + torch.randn(n, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(SIGMA).T


def run(sampler, gamma, steps, start, kappa=100.0, potential=gaussian_potential, seed=2):
    chains = LatentChains(potential, start, BatchNoise(len(start), seed), sampler, gamma, kappa)
    chains.advance(steps)
    return chains


def assert_moments(zs, mean, cov, tol_mean=0.03, tol_cov=0.05):
    assert torch.allclose(zs.mean(0), mean, atol=tol_mean), zs.mean(0)
    assert torch.allclose(torch.cov(zs.T), cov, atol=tol_cov), torch.cov(zs.T)


def acceptance(chains) -> float:
    return chains.accepted.sum().item() / (len(chains.z) * chains.steps)


@pytest.mark.parametrize("gamma", [0.5, 0.1])
def test_ula_stationary_variance_is_its_discretisation_bias(gamma):
    """On N(0, 1), z' = (1 - gamma/2) z + sqrt(gamma) xi is AR(1) with stationary variance 1 / (1 - gamma/4):
    1.142857 at gamma 0.5 (not 1: ULA is biased), 1.025641 at 0.1. 10^5 chains: standard error ~0.005."""
    chains = run(
        "langevin",
        gamma,
        150,
        torch.zeros(100_000, 1, dtype=torch.float64),
        potential=lambda z: 0.5 * z.square().sum(1),
    )
    assert chains.z.mean().abs() < 0.015
    assert chains.z.var().item() == pytest.approx(1 / (1 - gamma / 4), abs=0.015)


@pytest.mark.parametrize("gamma,expected", [(0.1, 0.98), (0.5, 0.81)])
def test_mala_moments_and_acceptance(gamma, expected):
    """From the origin (not the target), 120 steps: exact mean and covariance, and the expected acceptance rate."""
    chains = run("mala", gamma, 120, torch.zeros(20_000, 2, dtype=torch.float64))
    assert acceptance(chains) == pytest.approx(expected, abs=0.01)
    assert_moments(chains.z, MU, SIGMA, 0.04, 0.08)


@pytest.mark.parametrize("sampler,gamma", [("mala", 0.5), ("hmc", 0.3), ("hmc", 0.5), ("mh", 1.0)])
def test_metropolis_samplers_leave_the_target_exactly_invariant(sampler, gamma):
    """Chains started at exact draws from the target stay distributed as the target after 30 large steps (ULA at
    such steps would not). GEBM's MALA coefficient gamma/4 gives Var(z2) 1.13 here and its stale HMC gradient a
    covariance of 0.62 (gamma 0.3): both fail. 5 x 10^4 chains: standard errors below 0.013."""
    chains = run(sampler, gamma, 30, gaussian_samples(50_000, 1))
    assert_moments(chains.z, MU, SIGMA, 0.03, 0.05)
    assert 0.3 < acceptance(chains) < 0.999


@pytest.mark.parametrize("gamma,expected", [(0.01, 0.997), (0.1, 0.936)])
def test_hmc_moments_and_acceptance(gamma, expected):
    chains = run("hmc", gamma, 100, torch.zeros(20_000, 2, dtype=torch.float64))
    assert acceptance(chains) == pytest.approx(expected, abs=0.01)
    assert_moments(chains.z, MU, SIGMA, 0.04, 0.08)
    assert chains.nfe == 1 + 100 * 2  # L = 2 gradients per step, the current state's cached from the last step


def aboba_stationary_covariance(precision, gamma, kappa):
    """Exact stationary covariance of (z - mu, v) under the underdamped "ABOBA" step on a Gaussian, written out as
    a linear map x' = M x + B xi and solved from the discrete Lyapunov equation S = M S M^T + B B^T."""
    d = precision.shape[0]
    h, eye, zero = 2 * math.sqrt(gamma), torch.eye(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
    c, s = math.exp(-kappa * h), math.sqrt(1 - math.exp(-2 * kappa * h))
    drift = torch.cat([torch.cat([eye, h / 2 * eye], 1), torch.cat([zero, eye], 1)])  # z += (h/2) v
    kick = torch.cat([torch.cat([eye, zero], 1), torch.cat([-h / 2 * precision, eye], 1)])  # v -= (h/2) grad U
    friction = torch.cat([torch.cat([eye, zero], 1), torch.cat([zero, c * eye], 1)])  # v *= C (+ S xi)
    m, b = drift @ kick @ friction @ kick @ drift, drift @ kick @ torch.cat([zero, s * eye])
    n = 2 * d
    vec = torch.linalg.solve(torch.eye(n * n, dtype=torch.float64) - torch.kron(m, m), (b @ b.T).reshape(-1))
    return vec.reshape(n, n)


def test_underdamped_langevin_stationary_law_is_exact_for_its_discretisation():
    """Reference §6.8: on N(0, 1) ABOBA keeps the position variance exactly 1 and the velocity variance
    1 / (1 - h^2/4) (gamma 0.01: 1.010101; 0.25: 1.333333), any kappa; the 2-D chains (v_0 = 0, GEBM's start)
    match the Lyapunov solution for (z, v) entry by entry."""
    for gamma, vel in ((0.01, 1.010101), (0.25, 4 / 3)):
        exact = aboba_stationary_covariance(torch.ones(1, 1, dtype=torch.float64), gamma, 2.0)
        assert torch.allclose(exact, torch.tensor([[1.0, 0.0], [0.0, vel]], dtype=torch.float64), atol=1e-6)
    exact = aboba_stationary_covariance(PRECISION, 0.1, 1.0)
    chains = run("lmc", 0.1, 150, gaussian_samples(50_000, 1), kappa=1.0)
    states = torch.cat([chains.z - MU, chains.v], dim=1)
    assert torch.allclose(states.mean(0), torch.zeros(4, dtype=torch.float64), atol=0.03)
    assert torch.allclose(torch.cov(states.T), exact, atol=0.05), (torch.cov(states.T), exact)
    assert exact[2, 2] > 1.05  # the velocity law is visibly not N(0, I): the comparison has teeth


def test_zero_temperature_langevin_is_gradient_descent_to_the_mode():
    start = torch.tensor([[0.0, 0.0], [3.0, 1.0], [-2.0, -5.0]], dtype=torch.float64)
    chains = run("zero_temperature_langevin", 0.2, 25, start)
    step = torch.eye(2, dtype=torch.float64) - 0.1 * PRECISION  # z - mu <- (I - gamma/2 P)(z - mu)
    expected = MU + (start - MU) @ torch.linalg.matrix_power(step, 25).T
    assert torch.allclose(chains.z, expected, atol=1e-12)


def mixture_potential(zs):
    """Equal mixture of N((+-1, 0.5), 0.7^2 I): U = -log p up to a constant."""
    centres = torch.tensor([[1.0, 0.5], [-1.0, 0.5]], dtype=torch.float64)
    sq = (zs[:, None, :] - centres[None]).square().sum(-1) / (2 * 0.49)
    return -torch.logsumexp(-sq, dim=1)


@pytest.mark.parametrize("sampler,gamma", [("langevin", 0.02), ("mala", 0.3), ("lmc", 0.05), ("hmc", 0.1), ("mh", 1.0)])
def test_every_sampler_on_a_gaussian_mixture(sampler, gamma):
    """From N(0, I), 200 steps: mean (0, 0.5), covariance diag(1.49, 0.49). ULA and LMC run at small steps
    (their bias is O(gamma)); kappa 1 lets LMC's momentum carry chains between the modes."""
    start = torch.randn(8_000, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    chains = run(sampler, gamma, 200, start, kappa=1.0, potential=mixture_potential)
    mean, cov = (
        torch.tensor([0.0, 0.5], dtype=torch.float64),
        torch.diag(torch.tensor([1.49, 0.49], dtype=torch.float64)),
    )
    assert_moments(chains.z, mean, cov, 0.05, 0.08)


class QuadraticGEBM(nn.Module):
    """Identity base and energy D(x) = (beta/2) ||x - m||^2: with temperature T the latent target is
    N(T beta m / (1 + T beta), I / (1 + T beta))."""

    def __init__(self, m, beta):
        super().__init__()
        self.m, self.beta, self.z_dim = m, beta, len(m)
        self.base, self.scale = nn.Identity(), nn.Parameter(torch.ones((), dtype=torch.float64))

    def energy(self, x):
        return self.scale * self.beta / 2 * (x - self.m).square().sum(1)


def test_temperature_multiplies_the_energy():
    """Reference §6.8: T = 100, beta = 0.01 gives mean m/2 and variance 0.5 (MALA, 150 steps from the prior)."""
    m = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    model = QuadraticGEBM(m, 0.01)
    start = torch.randn(20_000, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    chains = run("mala", 0.2, 150, start, potential=latent_potential(model, 100.0))
    assert_moments(chains.z, m / 2, 0.5 * torch.eye(3, dtype=torch.float64), 0.03, 0.03)


def test_step_decay_schedule():
    chains = LatentChains(gaussian_potential, torch.zeros(1, 2), BatchNoise(1, 0), "langevin", 1e-2, 100.0, 0.1, 200)
    assert [chains.gamma_at(k) for k in (1, 200, 201, 400, 401)] == pytest.approx([1e-2, 1e-2, 1e-3, 1e-3, 1e-4])


@pytest.fixture(scope="module")
def toy_gebm():
    torch.manual_seed(0)
    model = build_gebm("gebm", g_model="mlp", gen_kwargs=dict(z_dim=3, width=16, depth=2), d_model="mlp",
                       disc_kwargs=dict(width=16, depth=2))  # fmt: skip
    return model.double().eval()


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_chains_depend_on_their_seed_not_their_batch(toy_gebm, sampler):
    """Each chain's noise comes from its seed's own generator, whose first draw is the GAN convention's latent:
    the same seeds in one batch of 6 or in batches of 2 and 4 give the same chains."""
    settings = dict(latent_sampler=sampler, num_sampler_steps=7, lmc_gamma=0.05, lmc_kappa=10.0, temperature=1.0,
                    lmc_gamma_decay=0.5, lmc_gamma_decay_every=3)  # fmt: skip
    together, _ = gebm_images(toy_gebm, list(range(6)), None, "cpu", **settings)
    split = [gebm_images(toy_gebm, seeds, None, "cpu", **settings)[0] for seeds in ([0, 1], [2, 3, 4, 5])]
    assert torch.allclose(together, torch.cat(split), atol=1e-12, rtol=0)
    base, nfe = gebm_images(toy_gebm, list(range(6)), None, "cpu")  # no settings: the base generator
    assert nfe == 1 and torch.equal(base, toy_gebm.base(seed_latents(list(range(6)), 3).double()))
    assert not torch.allclose(together, base)


def test_acceptance_and_frames_are_recorded(toy_gebm):
    record = {"frames_every": 2, "frame_chains": 3}
    settings = dict(latent_sampler="mala", num_sampler_steps=5, lmc_gamma=0.05, lmc_kappa=1.0, temperature=1.0,
                    lmc_gamma_decay=1.0, lmc_gamma_decay_every=200)  # fmt: skip
    for seeds in ([0, 1, 2, 3], [4, 5]):
        gebm_images(toy_gebm, seeds, None, "cpu", record=record, **settings)
    assert record["chains"] == 6 and record["accepted_per_step"].shape == (5,)
    assert 0 < record["accepted_per_step"].sum() <= 30
    assert [f.shape for f in record["frames"]] == [(3, 3)] * 4  # steps 0, 2, 4, 5 of the first batch


def test_sample_and_ebm_chain_take_the_same_latent_flags():
    """sample.py and ebm_chain.py share LatentMcmcConfig: the same flags, defaults (None = the seed's sampling run)
    and choices, resolved to the same settings."""
    import ebm_chain
    import sample
    from sampling.latent_mcmc import SEED_DEFAULTS, LatentMcmcConfig, latent_sampler_settings
    from utils.cli import UserError, parse

    given = ["--latent_sampler", "mala", "--num_sampler_steps", "7", "--lmc_gamma", "0.01", "--lmc_kappa", "3",
             "--temperature", "1", "--lmc_gamma_decay", "0.5", "--lmc_gamma_decay_every", "2"]  # fmt: skip
    expected = dict(latent_sampler="mala", num_sampler_steps=7, lmc_gamma=0.01, lmc_kappa=3.0, temperature=1.0,
                    lmc_gamma_decay=0.5, lmc_gamma_decay_every=2)  # fmt: skip
    for config in (sample.Config, ebm_chain.Config):
        assert issubclass(config, LatentMcmcConfig)
        assert latent_sampler_settings(parse(config, [])) == SEED_DEFAULTS
        assert latent_sampler_settings(parse(config, given)) == expected
        with pytest.raises(UserError, match="invalid choice"):
            parse(config, ["--latent_sampler", "gibbs"])
