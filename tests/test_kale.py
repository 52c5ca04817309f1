"""KALE (losses/kale.py, metrics/kale.py) against closed forms, GEBM's penalties
and gradient transform, and the GEBM architectures (modelling/sngan.py, modelling/gebm.py)."""

import math

import pytest
import torch
from torch import nn

from losses.kale import (
    batch_log_partition,
    kale_base_loss,
    kale_energy_loss,
    kale_gradient_penalty,
    kale_penalty,
    l2_penalty,
    monte_carlo_log_partition,
    transform_gradients,
)
from metrics.kale import KALEEvaluator
from modelling import build_gebm
from modelling.gebm import Energy
from utils.data import PointDataset
from utils.run import NOT_RANKED


def normal(n, seed, mean=0.0):
    return mean + torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_log_partition_of_a_quadratic_energy():
    """Base N(0, 1), D(x) = c x^2 / 2: A* = log E exp(-D) = -log(1 + c) / 2 (c = 1: -0.346574). The running
    Monte-Carlo estimate over 10 batches of 10^4 is within 1e-2, and it zeroes L_E's A-gradient exactly."""
    c = 1.0
    zs = normal(100_000, 0)
    estimate = monte_carlo_log_partition(lambda x: c * x**2 / 2, lambda z: z, zs.split(10_000))
    assert estimate.item() == pytest.approx(-0.5 * math.log(1 + c), abs=1e-2)
    assert estimate.item() == pytest.approx(batch_log_partition(c * zs**2 / 2).item(), abs=1e-12)
    a = estimate.clone().requires_grad_(True)
    kale_energy_loss(torch.zeros(3, dtype=torch.float64), c * zs**2 / 2, a).backward()
    assert abs(a.grad.item()) < 1e-12  # dL_E/dA = 1 - mean exp(-(D + A)) = 0 at the batch log-partition


@pytest.mark.parametrize("m", [1.0, 2.0])
def test_kale_between_gaussians_with_a_known_density_ratio(m):
    """P = N(m, 1), G = N(0, 1), log dP/dG(x) = m x - m^2/2. With the optimal energy D + A = -log dP/dG, KALE
    = KL(P || G) = m^2/2; with half the slope (D = -m x / 2 and its best A = m^2/8) KALE = 3m^2/8 < KL.
    10^6 samples: standard errors below 3e-3 (m = 1) and 8e-3 (m = 2)."""
    data, base = normal(1_000_000, 1, m), normal(1_000_000, 2)
    kale = -kale_energy_loss(-m * data + m**2 / 2, -m * base + m**2 / 2, torch.zeros((), dtype=torch.float64))
    assert kale.item() == pytest.approx(m**2 / 2, abs=4 * m**2 * 3e-3)
    half = -kale_energy_loss(-m * data / 2, -m * base / 2, torch.tensor(m**2 / 8, dtype=torch.float64))
    assert half.item() == pytest.approx(3 * m**2 / 8, abs=4 * m**2 * 3e-3)


def test_learned_linear_energy_and_log_partition_reach_the_density_ratio():
    """Minimising L_E over a linear energy a x + b and A on P = N(1, 1) vs G = N(0, 1) gives a = -m,
    A + b = m^2/2 and -L_E = KALE = KL = 1/2."""
    m, data, base = 1.0, normal(200_000, 3, 1.0), normal(200_000, 4)
    a, b, log_partition = (torch.zeros((), dtype=torch.float64, requires_grad=True) for _ in range(3))
    optimizer = torch.optim.LBFGS([a, b, log_partition], lr=1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = kale_energy_loss(a * data + b, a * base + b, log_partition)
        loss.backward()
        return loss

    optimizer.step(closure)
    assert a.item() == pytest.approx(-m, abs=0.02) and (log_partition + b).item() == pytest.approx(m**2 / 2, abs=0.02)
    assert -closure().item() == pytest.approx(0.5, abs=0.01)


def test_base_gradient_is_the_softmax_weighted_energy_gradient():
    """Reference §6.9 c: dL_G/dtheta = sum_i softmax(-D(G(z)))_i dD(G_theta(z_i))/dtheta; the data term has no
    theta-gradient."""
    torch.manual_seed(0)
    base, energy = nn.Linear(3, 2).double(), nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    zs, reals = torch.randn(6, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    d_fakes = energy(base(zs)).flatten()
    grads = torch.autograd.grad(kale_base_loss(energy(reals).flatten(), d_fakes), list(base.parameters()))
    weights = torch.softmax(-d_fakes.detach(), dim=0)
    expected = [torch.zeros_like(p) for p in base.parameters()]
    for i in range(6):
        per_sample = torch.autograd.grad(energy(base(zs[i : i + 1])).sum(), list(base.parameters()))
        expected = [e + weights[i] * g for e, g in zip(expected, per_sample, strict=True)]
    for g, e in zip(grads, expected, strict=True):
        assert torch.allclose(g, e, atol=1e-12)


def test_gradient_transform_of_the_energy_step():
    """GEBM's "grad_clip": network gradients g -> 2g / (1 + g^2); A's g = 1 - m -> g / (1 - g) = 1/m - 1, with
    m = mean exp(-(D(G(z)) + A)); non-finite results -> 0."""
    energy = Energy(nn.Linear(2, 1), floor=None)
    d_fakes = torch.tensor([0.3, -0.2, 1.0])
    loss = kale_energy_loss(energy(torch.randn(4, 2)).flatten(), d_fakes, energy.log_partition)
    loss.backward()
    raw_weight = energy.net.weight.grad.clone()
    m = torch.exp(-(d_fakes + energy.log_partition.detach())).mean()
    assert energy.log_partition.grad.item() == pytest.approx(1 - m.item(), rel=1e-6)
    transform_gradients(energy)
    assert torch.allclose(energy.net.weight.grad, 2 * raw_weight / (1 + raw_weight**2))
    assert energy.log_partition.grad.item() == pytest.approx(1 / m.item() - 1, rel=1e-5)
    energy.log_partition.grad.fill_(1.0)  # m = 0: g / (1 - g) = inf, zeroed as GEBM does
    transform_gradients(energy)
    assert energy.log_partition.grad.item() == 0


class LinearEnergy(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.net = nn.Linear(len(a), 1, bias=True)
        with torch.no_grad():
            self.net.weight.copy_(torch.tensor([a]))
        self.log_partition = nn.Parameter(torch.zeros(()))

    def network_parameters(self):
        return list(self.net.parameters())

    def forward(self, x, labels=None):
        return self.net(x.flatten(1)).flatten()


def test_penalties():
    """`gradient`: mean ||grad D(x_hat)||^2 with no "-1" target, = ||a||^2 for any linear energy; `l2`: sum of
    squared parameters (A excluded); `gradient_l2`: l2 / (sum over parameters of their shape's dims) + gradient."""
    energy = LinearEnergy([3.0, -4.0])
    reals, fakes = torch.randn(5, 2), torch.randn(7, 2)
    assert kale_gradient_penalty(energy, reals, fakes).item() == pytest.approx(25.0)
    squares = 25.0 + energy.net.bias.item() ** 2
    assert kale_penalty("l2", energy, reals, fakes).item() == pytest.approx(squares)
    assert kale_penalty("gradient_l2", energy, reals, fakes).item() == pytest.approx(squares / (1 + 2 + 1) + 25.0)
    assert kale_penalty("none", energy, reals, fakes).item() == 0
    conv = nn.Conv2d(3, 128, 3, bias=False)
    assert l2_penalty([conv.weight], normalised=True).item() == pytest.approx(conv.weight.square().sum().item() / 137)


def test_energy_floor_and_wrapper():
    """D is clamped below at -10 (relu(D + 10) - 10) unless --no_trunc; one state dict holds base, energy, A."""
    energy = Energy(LinearEnergy([1.0]).net)
    x = torch.tensor([[-30.0], [-5.0], [4.0]])
    assert energy(x).flatten().tolist() == pytest.approx(torch.clamp(energy.net(x).flatten(), min=-10).tolist())
    model = build_gebm("gebm", g_model="mlp", gen_kwargs=dict(z_dim=2), d_model="mlp", disc_kwargs={})
    keys = set(model.state_dict())
    assert "energy.log_partition" in keys and any(k.startswith("base.") for k in keys)
    assert model.log_partition is model.energy.log_partition


def test_sngan_and_resnet_layouts_at_32():
    """Reference §4.5: SN-GAN standard CNN and ResNet, base and energy, at 32x32 with 3 channels."""
    model = build_gebm("gebm", g_model="sngan", gen_kwargs=dict(img_channels=3), d_model="sngan",
                       disc_kwargs=dict(img_channels=3))  # fmt: skip
    assert model.base.dense.out_features == 512 * 4 * 4
    convs = [(m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0]) for m in model.base.modules()
             if isinstance(m, nn.ConvTranspose2d)]  # fmt: skip
    assert convs == [(512, 256, 4, 2), (256, 128, 4, 2), (128, 64, 4, 2), (64, 3, 3, 1)]
    convs = [(m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0]) for m in model.energy.modules()
             if isinstance(m, nn.Conv2d)]  # fmt: skip
    assert convs == [(3, 64, 3, 1), (64, 128, 4, 2), (128, 128, 3, 1), (128, 256, 4, 2), (256, 256, 3, 1),
                     (256, 512, 4, 2), (512, 512, 3, 1)]  # fmt: skip
    assert all(hasattr(m, "parametrizations") for m in model.energy.modules() if isinstance(m, nn.Conv2d))
    assert not hasattr(model.energy.net.fc, "parametrizations") and model.energy.net.fc.in_features == 8192
    resnet = build_gebm("gebm", g_model="resnet-sn", gen_kwargs=dict(img_channels=3), d_model="resnet-sn",
                        disc_kwargs=dict(img_channels=3))  # fmt: skip
    assert resnet.base.dense.out_features == 128 * 4 * 4 and len(resnet.base.net) == 3 + 4
    fc = resnet.energy.net.fc
    assert hasattr(fc, "parametrizations") and fc.in_features == 128
    for gebm in (model, resnet):
        assert not any(isinstance(m, nn.BatchNorm2d) for m in gebm.energy.modules())  # per-sample energies
        x = gebm(torch.randn(4, 100))
        assert x.shape == (4, 3, 32, 32) and x.abs().max() <= 1
        gebm.energy(x).sum().backward()
        assert all(p.grad is not None for p in gebm.parameters() if p is not gebm.log_partition)


def test_kale_evaluator_on_gaussians_with_a_known_density_ratio():
    """metrics/kale.py with an identity base on N(0, 1), data N(1, 1) and the optimal energy -x (A = 1/2):
    KALE = KL = 1/2 on 50k data points and 50k seeds (the fake term is exactly 1 in expectation)."""

    class ExactGEBM(nn.Module):
        z_dim = 1

        def __init__(self):
            super().__init__()
            self.log_partition = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

        def energy(self, x):
            return -x.flatten().double()

    def base_samples(model, seeds, labels, device):
        return torch.stack([torch.randn(1, generator=torch.Generator().manual_seed(s)) for s in seeds]), 1

    from accelerate import Accelerator

    data = PointDataset(normal(50_000, 5, 1.0).float()[:, None], torch.zeros(50_000, dtype=torch.int64), 0)
    result = KALEEvaluator(Accelerator(cpu=True), 50_000, data, test_dataset=data)(base_samples, ExactGEBM())
    assert result["metric"] == "kale" and result["value"] == pytest.approx(0.5, abs=0.03)
    assert result["kale_test"] == result["value"] and "kale" in NOT_RANKED
