"""Each optimizer step of ebm_train.py (GEBM, Arbel, Zhou & Gretton 2021) pinned by a value computed by hand on a fixed
tiny batch: the energy step's L_E + lambda * penalty for every penalty, the base step's KALE in Donsker-Varadhan form
and its weights' effective sample size, which network receives gradient, GEBM's schedule of energy and base steps
and its learning-rate decay. The latent chains' step sizes follow the decay inside a chain, and a chain settles on
the closed-form posterior of a quadratic energy. A short 2-D run learns: KALE and the base's FD to the data fall."""

import json
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import ebm_train
from modelling.common import apply_spectral_norm
from modelling.gebm import Energy, ToyEnergy, ToyGenerator
from sampling.latent_mcmc import LatentChains, latent_potential
from tests.conftest import read_stats
from utils.ckpt import load_training_state
from utils.cli import parse

EBM_A = 0.3  # the log-partition A of the hand-computed steps
EBM_LAMBDA = 0.7
EBM_REALS = torch.tensor([[0.5, -1.0], [1.5, 0.2], [-0.3, 0.8]], dtype=torch.float64)
EBM_ZS = torch.tensor([[0.1, 0.4], [-1.2, 0.3], [0.7, -0.9], [2.0, 1.1]], dtype=torch.float64)  # noise_factor > 1


def _ebm_nets(seed: int = 0):
    """A tiny MLP base and energy (one hidden layer of 3, float64) with A = EBM_A, their output layers scaled up so
    that the fakes' energies differ (the base step's weights are then far from uniform)."""
    torch.manual_seed(seed)
    gen = ToyGenerator(z_dim=2, dim=2, width=3, depth=1).double()
    energy = Energy(ToyEnergy(dim=2, width=3, depth=1), floor=-10.0).double()
    with torch.no_grad():
        gen.net[-1].weight.mul_(8)
        energy.net.net[-1].weight.mul_(4)
        energy.log_partition.fill_(EBM_A)
    return gen, energy


def _ebm_layers(energy):
    first, _, last = energy.net.net  # Linear, SiLU, Linear
    return first.weight, first.bias, last.weight[0], last.bias[0]


def _ebm_energy_by_hand(energy, x):
    """D(x) = max(w2 . silu(W1 x + b1) + b2, -10), from the weights."""
    w1, b1, w2, b2 = _ebm_layers(energy)
    u = x @ w1.T + b1
    return torch.clamp((u * torch.sigmoid(u)) @ w2 + b2, min=-10.0)


def _ebm_input_gradient_by_hand(energy, x):
    """grad_x D(x) = W1^T (w2 * silu'(W1 x + b1)), silu'(u) = s (1 + u (1 - s)), s = sigmoid(u) (above the floor)."""
    w1, b1, w2, _ = _ebm_layers(energy)
    u = x @ w1.T + b1
    s = torch.sigmoid(u)
    return (s * (1 + u * (1 - s)) * w2) @ w1


@pytest.mark.parametrize("penalty_type", ["none", "l2", "gradient_l2", "gradient"])
def test_energy_step_loss_by_hand(penalty_type):
    gen, energy = _ebm_nets()
    cfg = ebm_train.Config(penalty_type=penalty_type, penalty_lambda=EBM_LAMBDA)
    torch.manual_seed(5)  # the gradient penalty's interpolation weights
    loss, stats = ebm_train.energy_step_loss(gen, energy, EBM_REALS, EBM_ZS, cfg)

    with torch.no_grad():
        fakes = gen(EBM_ZS)
        d_reals, d_fakes = _ebm_energy_by_hand(energy, EBM_REALS), _ebm_energy_by_hand(energy, fakes)
        kale_loss = (d_reals + EBM_A).mean() + torch.exp(-(d_fakes + EBM_A)).mean() - 1
        params = list(energy.net.parameters())  # A is not penalised
        l2 = sum(p.square().sum() for p in params)
        dims = sum(sum(p.shape) for p in params)  # GEBM's normaliser: 3x2 weight counts 5
        torch.manual_seed(5)
        alpha = torch.rand(3, 1, dtype=torch.float64)  # the first min(3, 4) reals and fakes
        x_hat = alpha * EBM_REALS + (1 - alpha) * fakes[:3]
        grad_penalty = _ebm_input_gradient_by_hand(energy, x_hat).square().sum(1).mean()
        penalty = {"none": 0.0, "l2": l2, "gradient_l2": l2 / dims + grad_penalty, "gradient": grad_penalty}
    assert d_fakes.min() > -10 and grad_penalty > 1e-3 and l2 > 1e-2  # every term is live
    assert loss.item() == pytest.approx((kale_loss + EBM_LAMBDA * penalty[penalty_type]).item(), rel=1e-10)
    assert stats["loss/energy"].item() == pytest.approx(kale_loss.item(), rel=1e-10)
    assert stats["penalty"].item() == pytest.approx(float(penalty[penalty_type]), rel=1e-10, abs=1e-12)
    assert (stats["d/real"].item(), stats["d/fake"].item()) == pytest.approx(
        (d_reals.mean().item(), d_fakes.mean().item())
    )

    # D and A receive the gradient, the base none; dL_E/dA = 1 - mean exp(-(D(G(z)) + A)).
    loss.backward()
    assert all(p.grad is None for p in gen.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in energy.net.parameters())
    expected_a_grad = 1 - torch.exp(-(d_fakes + EBM_A)).mean()
    assert energy.log_partition.grad.item() == pytest.approx(expected_a_grad.item(), rel=1e-10)


def test_base_step_loss_ess_and_gradients_by_hand():
    gen, energy = _ebm_nets()
    loss, stats = ebm_train.base_step_loss(gen, energy, EBM_REALS, EBM_ZS)
    loss.backward()

    # L_G = -mean D(x) - log mean exp(-D(G(z))): the Donsker-Varadhan KALE, descended by the base.
    with torch.no_grad():
        d_reals, d_fakes = _ebm_energy_by_hand(energy, EBM_REALS), _ebm_energy_by_hand(energy, gen(EBM_ZS))
        kale = -d_reals.mean() - torch.log(torch.exp(-d_fakes).mean())
        weights = torch.exp(-d_fakes) / torch.exp(-d_fakes).sum()
    assert loss.item() == pytest.approx(kale.item(), rel=1e-10)
    assert stats["base/ess"].item() == pytest.approx((1 / weights.square().sum()).item(), rel=1e-6)
    assert 1.5 < stats["base/ess"].item() < len(EBM_ZS) - 0.5  # unequal weights: the check has teeth

    # The base's gradient is sum_i w_i grad D(G(z_i)); the energy and A get none and are left trainable.
    fakes = gen(EBM_ZS)
    expected = torch.autograd.grad((weights * _ebm_energy_by_hand(energy, fakes)).sum(), list(gen.parameters()))
    for p, g in zip(gen.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in energy.parameters())
    assert energy.training and all(p.requires_grad for p in energy.parameters())

    # The energy runs in eval mode: a spectrally normalised energy's power iteration does not advance.
    torch.manual_seed(2)
    sn_energy = Energy(apply_spectral_norm(ToyEnergy(dim=2, width=3, depth=1))).double()
    before = {k: v.clone() for k, v in sn_energy.state_dict().items()}
    ebm_train.base_step_loss(gen, sn_energy, EBM_REALS, EBM_ZS)
    assert all(torch.equal(before[k], v) for k, v in sn_energy.state_dict().items())
    assert sn_energy.training


def test_schedule_of_energy_and_base_steps_by_hand():
    """GEBM's rule with n_iter_d_init 3, n_iter_d 2: a base step when counter % (n + 1) == 0 and counter > 3, with
    n = 3 before the 2nd base step and right after every 500th, else n = 2."""
    cfg = ebm_train.Config(n_iter_d_init=3, n_iter_d=2)
    firsts, base_steps = [], 0
    for counter in range(1, 3010):
        if ebm_train.is_base_step(counter, base_steps, cfg):
            base_steps += 1
            firsts.append(counter)
    assert firsts[:6] == [4, 8, 9, 12, 15, 18]
    assert firsts[499:503] == [1500, 1504, 1506, 1509]  # 500th at 9 + 3 * 497; then a long phase to 1504
    assert firsts[999:1002] == [3000, 3004, 3006]  # the 1,000th
    assert [ebm_train.iterations_for(n, cfg) for n in (1, 3, 501)] == [4, 9, 1504]
    # No base step up to iteration n_iter_d_init, whatever the count (a run resumed with a larger --n_iter_d_init).
    late = ebm_train.Config(n_iter_d_init=6, n_iter_d=2)
    assert [c for c in range(1, 13) if ebm_train.is_base_step(c, 5, late)] == [9, 12]
    for mode, expected in (("energy", False), ("base", True)):
        mode_cfg = ebm_train.Config(n_iter_d_init=3, n_iter_d=2, train_mode=mode)
        assert all(ebm_train.is_base_step(c, 0, mode_cfg) == expected for c in range(1, 50))


def test_learning_rate_decay_by_hand(tmp_path):
    cfg = ebm_train.Config(use_scheduler=True, scheduler_gamma=0.5, scheduler_interval=3)
    assert [ebm_train.lr_factor(b, 1000, cfg) for b in (0, 2, 3, 5, 6, 7)] == [1, 1, 0.5, 0.5, 0.25, 0.25]
    energy_cfg = ebm_train.Config(use_scheduler=True, scheduler_gamma=0.5, scheduler_interval=3, train_mode="energy")
    assert [ebm_train.lr_factor(0, s, energy_cfg) for s in (2, 3, 6)] == [1, 0.5, 0.25]  # iterations done
    assert ebm_train.lr_factor(7, 7, ebm_train.Config(scheduler_gamma=0.5, scheduler_interval=3)) == 1  # off

    # The loop sets both optimizers' rates: base steps at iterations 4, 8, 9, so the 9th runs after 2 of them.
    ebm_train.cli(["--dataset", "gaussians", "--batch_size", "16", "--n_steps", "9", "--n_iter_d_init", "3",
                   "--n_iter_d", "2", "--use_scheduler", "--scheduler_gamma", "0.5", "--scheduler_interval", "1",
                   "--lr", "0.01", "--lr_generator", "0.02", "--log_interval", "9", "--sample_interval", "0",
                   "--log_dir", str(tmp_path), "--log_name", "lr", "--loggers", "none"])  # fmt: skip
    state = load_training_state(tmp_path / "lr" / "states" / "state-00000009")
    rates = [state[name]["param_groups"][0]["lr"] for name in ("optim_e", "optim_g")]
    assert rates == pytest.approx([0.01 * 0.25, 0.02 * 0.25])
    row = read_stats(tmp_path / "lr")[-1]
    assert row["lr_factor"] == 0.25 and row["base_steps"] == 3


class _EbmBatchNoise:
    """Gaussian noise for a batch of chains from one generator (ChainNoise's per-chain generators are slower)."""

    def __init__(self, n: int, seed: int):
        self.n, self.generator = n, torch.Generator().manual_seed(seed)

    def randn(self, dim, device=None, dtype=torch.float32):
        return torch.randn(self.n, dim, generator=self.generator).to(device, dtype)


class _EbmFixedNoise:
    """The same xi at every step, so a chain can be followed by hand."""

    def __init__(self, xi: torch.Tensor):
        self.xi = xi

    def randn(self, dim, device=None, dtype=torch.float32):
        return self.xi.to(device, dtype)


@pytest.mark.parametrize("sampler", ["langevin", "zero_temperature_langevin"])
def test_latent_step_sizes_follow_the_decay_inside_a_chain(sampler):
    """U(z) = c |z|^2 / 2: step k is z <- (1 - gamma_k c / 2) z + sqrt(gamma_k) xi (no xi at zero temperature), with
    gamma_k = gamma * decay^floor((k - 1) / every), advanced in chunks that do not line up with the decay."""
    c, gamma, decay, every = 2.0, 0.3, 0.5, 3
    z0 = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)
    xi = torch.tensor([[0.2, -0.1], [-0.4, 0.3]], dtype=torch.float64)
    chains = LatentChains(lambda z: 0.5 * c * z.square().sum(1), z0, _EbmFixedNoise(xi), sampler, gamma,
                          gamma_decay=decay, decay_every=every)  # fmt: skip
    z = z0.clone()
    for chunk in (2, 4, 2):
        chains.advance(chunk)
        for k in range(chains.steps - chunk + 1, chains.steps + 1):
            gamma_k = gamma * decay ** ((k - 1) // every)
            z = (1 - gamma_k * c / 2) * z + (math.sqrt(gamma_k) * xi if sampler == "langevin" else 0)
        torch.testing.assert_close(chains.z, z, rtol=1e-12, atol=1e-12)
    assert chains.steps == 8


def test_latent_chains_settle_on_the_posterior_of_a_quadratic_energy():
    """Base G(z) = z, energy D(x) = a |x - m|^2 / 2, temperature T: U(z) = |z|^2 / 2 + T D(z) is Gaussian with
    precision P = 1 + T a and mean T a m / P; ULA's stationary law has that mean and variance gamma / (1 - (1 -
    gamma P / 2)^2) per coordinate."""
    a, temperature, gamma, m = 1.5, 2.0, 0.05, torch.tensor([1.0, -2.0])

    class Quadratic(nn.Module):
        def forward(self, x):
            return 0.5 * a * (x - m).square().sum(1)

    model = nn.Module()
    model.base, model.energy = nn.Identity(), Quadratic()
    noise = _EbmBatchNoise(4000, seed=0)
    chains = LatentChains(latent_potential(model, temperature), noise.randn(2), noise, "langevin", gamma)
    z = chains.advance(150)
    precision = 1 + temperature * a
    variance = gamma / (1 - (1 - gamma * precision / 2) ** 2)
    torch.testing.assert_close(z.mean(0), temperature * a * m / precision, rtol=0, atol=0.04)
    torch.testing.assert_close(z.var(0), torch.full((2,), variance), rtol=0.1, atol=0)


def test_a_short_2d_run_learns(tmp_path):
    """configs/gebm/gaussians.yaml for 500 iterations (52 base steps): the base's FD to the data falls below a tenth
    of the untrained base's (the eval at iteration 100 precedes every base step), KALE in its Donsker-Varadhan form
    (the base's loss) falls below a quarter of its value at the first base step, and base/ess is logged."""
    ebm_train.cli(["--config", "configs/gebm/gaussians.yaml", "--n_steps", "500", "--eval_interval", "100",
                   "--eval_samples", "1000", "--log_interval", "100", "--sample_interval", "0",
                   "--checkpoint_interval", "500", "--log_dir", str(tmp_path), "--log_name", "toy",
                   "--loggers", "none"])  # fmt: skip
    run_dir = tmp_path / "toy"
    fd = [json.loads((run_dir / "eval" / f"step-{s:08d}.json").read_text())["value"] for s in (100, 500)]
    rows = [r for r in read_stats(run_dir) if "loss/base" in r]
    assert fd[1] < 0.1 * fd[0], fd
    assert rows[-1]["loss/base"] < 0.25 * rows[0]["loss/base"], [r["loss/base"] for r in rows]
    assert all(1 <= r["base/ess"] <= 256 for r in rows) and rows[-1]["base_steps"] == 52


@pytest.mark.parametrize("config", ["fashion_mnist", "cifar10"])
def test_image_configs_have_a_spectrally_normalised_energy(config):
    """Every GEBM image energy is spectrally normalised; without it the base's weights collapse (README)."""
    path = f"configs/gebm/{config}.yaml"
    cfg = parse(ebm_train.Config, ["--config", path], resolve=ebm_train.resolve_config)
    model, _ = ebm_train.build_model(cfg, (1 if config == "fashion_mnist" else 3, 32, 32))
    convs = [m for m in model.energy.net.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(parametrize.is_parametrized(m, "weight") for m in convs)
