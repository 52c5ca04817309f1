"""GPM's particle models against closed forms: the Discriminator Flow velocity and update for
each loss, the critic losses' signs, the zero-centred gradient penalty, the critics (registry, batch independence,
stored Fourier frequencies); ScoreGAN's noise law, its unweighted score loss and its generator gradient, and T6:
SGD on the surrogate with exact Gaussian scores lands on the data's mean and std."""

import math

import pytest
import torch
from torch import nn

from losses import gradient_penalty
from losses.particle import (
    generator_score_loss,
    particle_loss,
    particle_velocity,
    score_gan_loss,
    score_gan_sigma,
)
from modelling import CRITICS, build_critic, build_discr_flow, build_score_gan_generator
from modelling.discr_flow import DiscriminatorFlow, FourierEmbedding
from sampling.particles import discr_flow_images, discriminator_flow, flow_settings
from utils.ckpt import build_from_snapshot
from utils.cli import UserError
from utils.data import mode_frequencies, toy_points


class LinearCritic(nn.Module):
    """c(x, t) = w·x + b (no parameters to train): genzoo's sign convention, high where w points."""

    def __init__(self, w, b: float = 0.0):
        super().__init__()
        self.register_buffer("w", torch.as_tensor(w, dtype=torch.float32))
        self.b, self.sample_shape = b, (len(w),)

    def forward(self, x, t):
        return x.flatten(1) @ self.w + self.b


class TimeLinearCritic(LinearCritic):
    """c(x, t) = (1 + t)·w·x: the velocity tells which time the flow evaluated the critic at."""

    def forward(self, x, t):
        return (1 + t) * (x.flatten(1) @ self.w)


def flow_of(critic, loss: str, n_steps: int = 8, eta: float = 2.0, **kwargs) -> DiscriminatorFlow:
    return DiscriminatorFlow(critic, loss=loss, n_steps=n_steps, eta=eta, **kwargs)


# ------------------------------------------------------------------------------------------ T7: the flow's signs
def test_ipm_and_hinge_move_every_particle_by_eta_over_k_times_w():
    """T7: a fixed linear critic lower on the particles than on the data (GPM's f = -w·x, here c = w·x with
    w = mu_data - mu_particles): u = w, so every particle moves by eta/K·w per step and by eta·w over the flow."""
    mu_data, mu_fake = torch.tensor([2.0, -1.0]), torch.tensor([-1.0, 0.5])
    w = mu_data - mu_fake
    z0 = mu_fake + torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    for loss in ("ipm", "hinge"):
        model = flow_of(LinearCritic(w), loss, n_steps=8, eta=2.0)
        u = particle_velocity(model.critic, z0, torch.zeros(64), particle_loss(loss))
        torch.testing.assert_close(u, w.expand(64, 2), rtol=0, atol=1e-6)
        states = discriminator_flow(model, z0, trajectory=True)
        assert states.shape == (9, 64, 2)
        torch.testing.assert_close(states[1:] - states[:-1], (2.0 / 8 * w).expand(8, 64, 2), rtol=0, atol=1e-5)
        torch.testing.assert_close(states[-1], z0 + 2.0 * w, rtol=0, atol=1e-5)
    # GPM's "14 of 56": 14 steps of the 56-step grid, t_k = k/56, go 14/56 of the way (plus the time factor below).
    early = discriminator_flow(flow_of(TimeLinearCritic(w), "ipm", n_steps=56, eta=20.0), z0, num_steps=14)
    torch.testing.assert_close(early, z0 + sum(20.0 / 56 * (1 + k / 56) for k in range(14)) * w, rtol=0, atol=1e-4)
    # Step k evaluates the critic at t_k = k/K: with c = (1 + t)·w·x it moves by eta/K·(1 + k/K)·w.
    states = discriminator_flow(flow_of(TimeLinearCritic(w), "ipm", n_steps=8, eta=2.0), z0, trajectory=True)
    steps = torch.stack([(2.0 / 8) * (1 + k / 8) * w for k in range(8)])[:, None].expand(8, 64, 2)
    torch.testing.assert_close(states[1:] - states[:-1], steps, rtol=0, atol=1e-5)


def test_entropy_noise_and_sample_settings():
    """GPM's entropy term: sqrt(entropy_reg/K)·eps after every step but the last, so a zero critic leaves the
    particles N(p_mean, p_std² + entropy_reg·(K - 1)/K). sample.py's --num_steps/--total_steps default to GPM's."""
    model = flow_of(LinearCritic([0.0, 0.0]), "ipm", n_steps=5, eta=2.0, p_mean=1.0, p_std=0.5, entropy_reg=2.0)
    z, nfe = discr_flow_images(model, list(range(20_000)), None, "cpu")
    assert nfe == 5 and z.mean().item() == pytest.approx(1.0, abs=0.02)
    assert z.var().item() == pytest.approx(0.25 + 2.0 * 4 / 5, rel=0.02)
    assert flow_settings(model, None, None) == dict(num_steps=5, total_steps=5)
    assert flow_settings(model, 3, None) == dict(num_steps=3, total_steps=3)  # GPM: total defaults to nb_steps
    assert flow_settings(model, 14, 56) == dict(num_steps=14, total_steps=56)
    with pytest.raises(UserError, match="num_steps <= --total_steps"):
        flow_settings(model, 60, 56)


def test_mode_frequencies_of_the_data_itself():
    """The 2-D check's yardstick: real gaussians points sit a fifth per mode, and 1 - exp(-4.5) = 98.9 % of them
    within 3 std of their mode."""
    freqs, off = mode_frequencies(toy_points("gaussians", train=True)[0])
    assert off == pytest.approx(math.exp(-4.5), abs=0.002)
    torch.testing.assert_close(
        freqs, torch.full((5,), (1 - math.exp(-4.5)) / 5, dtype=torch.float64), atol=0.005, rtol=0
    )


def test_fp16_recipe_scales_and_unscales_the_velocity():
    """Under fp16 the velocity is the gradient of the loss-scaled sum, divided by the scale again (PyTorch's AMP
    recipe): the same field, computed where small gradients do not underflow."""
    torch.manual_seed(0)
    critic = build_critic("mlp", dim=2, width=16, depth=2, emb_channels=8, init="default")
    z, t = torch.randn(32, 2), torch.rand(32)
    for loss in ("vanilla", "ipm"):
        plain = particle_velocity(critic, z, t, particle_loss(loss))
        scaled = particle_velocity(critic, z, t, particle_loss(loss), scale=2.0**14)
        torch.testing.assert_close(scaled, plain, rtol=1e-6, atol=1e-9)


def test_fourier_features_are_cos_and_sin_of_two_pi_f_t():
    emb = FourierEmbedding(8)
    t = torch.tensor([0.0, 0.25, 0.9])
    angles = 2 * math.pi * t[:, None] * emb.freqs[None]
    torch.testing.assert_close(emb(t), torch.cat([angles.cos(), angles.sin()], dim=1))
    assert FourierEmbedding(8192).freqs.std().item() == pytest.approx(16, rel=0.05)  # frequencies ~ N(0, 16²)


def test_vanilla_velocity_with_the_exact_log_ratio_points_to_the_data():
    """T7: with the exact log density ratio of two unit-variance Gaussians, c* = log p_data/p_fake =
    (mu_d - mu_f)·x - (|mu_d|² - |mu_f|²)/2, u = sigmoid(-c*)·(mu_d - mu_f) for every particle, and the flow moves
    the particles' mean toward the data's."""
    mu_d, mu_f = torch.tensor([3.0, 1.0]), torch.tensor([-1.0, -2.0])
    critic = LinearCritic(mu_d - mu_f, b=-float(mu_d.square().sum() - mu_f.square().sum()) / 2)
    z = mu_f + torch.randn(256, 2, generator=torch.Generator().manual_seed(1))
    u = particle_velocity(critic, z, torch.zeros(256), particle_loss("vanilla"))
    expected = torch.sigmoid(-critic(z, None))[:, None] * (mu_d - mu_f)
    torch.testing.assert_close(u, expected, rtol=1e-5, atol=1e-6)
    states = discriminator_flow(flow_of(critic, "vanilla", n_steps=20, eta=4.0), z, trajectory=True)
    gaps = (states.mean(1) - mu_d).norm(dim=1)
    assert (gaps[1:] < gaps[:-1]).all() and gaps[-1] < 0.6 * gaps[0], gaps


@pytest.mark.parametrize("loss", ["vanilla", "ipm", "hinge"])
def test_one_critic_step_then_the_flow_goes_toward_the_data(loss):
    """The loop closed for each loss: one gradient step of the critic loss on a linear critic, from zero, between
    data at mu_d and particles at mu_f, makes the particle velocity point from mu_f to mu_d."""
    mu_d, mu_f = torch.tensor([1.0, 2.0]), torch.tensor([-2.0, 0.0])
    g = torch.Generator().manual_seed(2)
    reals, fakes = mu_d + 0.3 * torch.randn(128, 2, generator=g), mu_f + 0.3 * torch.randn(128, 2, generator=g)
    w = torch.zeros(2, requires_grad=True)
    critic = lambda x, t: x @ w
    loss_fn = particle_loss(loss)
    loss_fn.d_loss(critic(reals, None), critic(fakes, None)).mean().backward()
    with torch.no_grad():
        w -= 0.1 * w.grad
    u = particle_velocity(critic, fakes, None, loss_fn)
    cos = nn.functional.cosine_similarity(u.mean(0), mu_d - mu_f, dim=0)
    assert cos > 0.99, cos


def test_vanilla_critic_optimum_is_the_log_density_ratio():
    """The vanilla D loss, minimised pointwise over the critic value c with data weight p_d and particle weight p_f,
    is stationary at c = log(p_d/p_f) (so the flow above is the one the trained critic gives)."""
    loss_fn = particle_loss("vanilla")
    p_d, p_f = torch.tensor([0.2, 1.0, 3.0]), torch.tensor([1.0, 1.0, 0.5])
    c = (p_d / p_f).log().requires_grad_(True)
    far = torch.full_like(c, 60.0)  # softplus(-60) = 0: isolates one term of the pair
    objective = p_d * loss_fn.d_loss(c, -far) + p_f * loss_fn.d_loss(far, c)
    (grad,) = torch.autograd.grad(objective.sum(), c)
    torch.testing.assert_close(grad, torch.zeros(3), rtol=0, atol=1e-6)


def test_zero_centred_gradient_penalty_on_points_with_a_time_input():
    """GPM's penalty (||grad|| - center)², at interpolates of 2-D points, the time passed as the critic's second
    input: a linear critic has gradient w everywhere."""
    w = torch.tensor([3.0, -4.0])  # |w| = 5
    critic = LinearCritic(w)
    reals, fakes, t = torch.randn(16, 2), torch.randn(16, 2), torch.rand(16)
    torch.testing.assert_close(gradient_penalty(critic, reals, fakes, t, center=0.0), torch.full((16,), 25.0))
    torch.testing.assert_close(gradient_penalty(critic, reals, fakes, t), torch.full((16,), 16.0))  # WGAN-GP's 1
    images = torch.randn(4, 1, 2, 1)  # images keep working: eps broadcasts per sample
    torch.testing.assert_close(gradient_penalty(critic, images, -images, None, center=2.0), torch.full((4,), 9.0))


# --------------------------------------------------------------------------------------------------- critics
CRITIC_CASES = {
    "mlp": dict(dim=2, width=16, depth=2, emb_channels=8),
    "dcgan": dict(img_size=32, img_channels=1, base_dim=4, emb_channels=8),
    "resnet": dict(img_size=32, img_channels=3, base_dim=4, emb_channels=8),
    "resnet64": dict(img_size=64, img_channels=3, base_dim=2, emb_channels=8),
    "dcgan64": dict(img_size=64, img_channels=3, base_dim=2, emb_channels=8),
}


@pytest.mark.parametrize("case", sorted(CRITIC_CASES))
def test_every_critic_is_per_sample_and_stores_its_frequencies(case):
    """Build, forward to (B,), backward into every parameter; the velocity of a particle does not depend on the
    others (no batch statistics); a snapshot rebuild under another seed loads the same Fourier frequencies."""
    name = case.rstrip("64")
    assert set(CRITICS) == {"mlp", "dcgan", "resnet"}
    torch.manual_seed(0)
    model = build_discr_flow(name, CRITIC_CASES[case], loss="ipm", n_steps=3, eta=2.0).double()
    z, t = torch.randn(5, *model.sample_shape, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    out = model(z, t)
    assert out.shape == (5,)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    loss = particle_loss("ipm")
    together = particle_velocity(model.critic, z, t, loss)
    alone = torch.cat([particle_velocity(model.critic, z[i : i + 1], t[i : i + 1], loss) for i in range(5)])
    torch.testing.assert_close(together, alone, rtol=1e-10, atol=1e-12)
    assert "critic.embed.freqs" in model.state_dict()
    torch.manual_seed(123)  # another seed: the frequencies must come from the weights, not from the RNG
    meta = dict(model=name, model_kwargs=dict(critic_kwargs=CRITIC_CASES[case], loss="ipm", n_steps=3, eta=2.0))
    rebuilt = build_from_snapshot(meta | {"path": "x"}, model.float().state_dict(), build_discr_flow)
    torch.testing.assert_close(rebuilt(z.float(), t.float()), model(z.float(), t.float()))


@pytest.mark.parametrize("name,init", [("dcgan", "orthogonal"), ("resnet", "normal")])
def test_conv_critics_start_from_gpms_init(name, init):
    """GPM's configs: dcgan orthogonal with gain 1.41, resnet N(0, 0.02), on every conv and linear layer, the time
    MLP and the modulations included; biases 0."""
    torch.manual_seed(0)
    critic = build_critic(name, img_size=32, img_channels=3, base_dim=16, emb_channels=32)
    layers = [m for m in critic.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert any(m in layers for m in critic.map_emb) and all(not m.bias.any() for m in layers if m.bias is not None)
    if init == "normal":
        weights = torch.cat([m.weight.flatten() for m in layers])
        assert abs(weights.std().item() - 0.02) < 1e-3 and abs(weights.mean().item()) < 1e-3
        return
    for m in layers:
        w = m.weight.flatten(1)
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        torch.testing.assert_close(gram, 1.41**2 * torch.eye(len(gram)), atol=1e-4, rtol=0)


def test_critics_refuse_what_they_cannot_be():
    with pytest.raises(ValueError, match="32 or 64 px"):
        build_critic("dcgan", img_size=28)
    with pytest.raises(TypeError):
        build_critic("dcgan", norm="batch")  # there is no BatchNorm option at all
    with pytest.raises(KeyError, match="valid"):
        build_critic("unet")
    with pytest.raises(ValueError, match="unknown particle loss"):
        build_discr_flow("mlp", dict(dim=2), loss="wgan")


def test_flow_samples_depend_on_their_seed_only():
    """Per-seed noise for the starting particle and for the entropy noise: the batch does not matter."""
    torch.manual_seed(0)
    model = build_discr_flow("mlp", dict(dim=2, width=16, depth=2, emb_channels=8), loss="vanilla", n_steps=6,
                             eta=3.0, entropy_reg=0.5).eval()  # fmt: skip
    seeds = list(range(10, 18))
    together, nfe = discr_flow_images(model, seeds, None, "cpu")
    alone = torch.cat([discr_flow_images(model, [s], None, "cpu")[0] for s in seeds])
    assert nfe == 6
    torch.testing.assert_close(together, alone, rtol=1e-6, atol=1e-6)
    other, _ = discr_flow_images(model, [s + 100 for s in seeds], None, "cpu")
    assert (other - together).abs().min() > 0


# -------------------------------------------------------------------------------------------------- ScoreGAN
def gaussian_denoiser(mean, var):
    """Exact EDM denoiser of N(mean, var) data: D(x; sigma) = mean + var/(var + sigma²)·(x - mean) (T1)."""
    return lambda x, sigma: mean + var / (var + sigma.reshape(-1, *[1] * (x.ndim - 1)) ** 2) * (x - mean)


def test_noise_law_is_edm_grid_made_continuous():
    sigma = score_gan_sigma(200_000, 0.1, 10.0, 3.0)
    assert 0.1 <= sigma.min() and sigma.max() <= 10.0
    # u ~ U[0, 1] maps monotonically: the median is the grid's midpoint, (mean of the rho-th roots)^rho.
    median = ((10.0 ** (1 / 3) + 0.1 ** (1 / 3)) / 2) ** 3
    assert sigma.median().item() == pytest.approx(median, rel=0.01)
    q = (10.0 ** (1 / 3) + 0.25 * (0.1 ** (1 / 3) - 10.0 ** (1 / 3))) ** 3  # 25 % of draws are above this
    assert (sigma > q).double().mean().item() == pytest.approx(0.25, abs=0.005)


def test_generator_score_loss_is_the_unweighted_denoising_error():
    """With the exact denoiser of the generator's N(b, a²) samples the loss is the posterior variance summed over
    elements, d·sigma²a²/(a² + sigma²): no lambda(sigma) weight, target the clean sample."""
    torch.manual_seed(0)
    a, b, d, sigma = 0.8, 0.5, 3, 0.6
    fakes = b + a * torch.randn(200_000, d)
    loss = generator_score_loss(gaussian_denoiser(b, a**2), fakes, torch.full((200_000,), sigma))
    assert loss.shape == (200_000,)
    assert loss.mean().item() == pytest.approx(d * sigma**2 * a**2 / (a**2 + sigma**2), rel=0.01)


def test_generator_gradient_is_sigma_times_the_score_difference():
    """d/dx of the surrogate = sigma·(w_gen ∇log p_gen - w_data ∇log p_data) at x~ = x + sigma·n, per sample; the
    score networks get no gradient."""
    mu, s2, b, a2, w_data, w_gen = 2.0, 0.49, -1.0, 0.25, 1.5, 0.7
    x = torch.randn(64, 1).requires_grad_(True)
    sigma = torch.rand(64) + 0.2
    torch.manual_seed(5)
    score_gan_loss(x, gaussian_denoiser(mu, s2), gaussian_denoiser(b, a2), sigma, w_data, w_gen).sum().backward()
    torch.manual_seed(5)
    noisy = x.detach() + sigma[:, None] * torch.randn(64, 1)  # the same noise
    score_data, score_gen = -(noisy - mu) / (s2 + sigma[:, None] ** 2), -(noisy - b) / (a2 + sigma[:, None] ** 2)
    expected = sigma[:, None] * (w_gen * score_gen - w_data * score_data)
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-6)


def test_t6_score_gan_converges_to_the_data_mean_and_std():
    """T6: generator x = a·z + b, data N(2, 0.7²), exact scores of both sides, sigma from the rho 3 law on
    [0.1, 10]; SGD (lr 0.05) on the surrogate from (0.1, -1) reaches (0.700, 2.000) (the reference runs 4,000 steps;
    1,500 of batch 256 already land within 1e-5: at the fixed point both scores agree for every sample)."""
    torch.manual_seed(0)
    gen = nn.Linear(1, 1)
    with torch.no_grad():
        gen.weight.fill_(0.1), gen.bias.fill_(-1.0)
    opt = torch.optim.SGD(gen.parameters(), lr=0.05)
    for _ in range(1500):
        a, b = gen.weight.detach().reshape(()), gen.bias.detach().reshape(())
        fakes = gen(torch.randn(256, 1))
        sigma = score_gan_sigma(256, 0.1, 10.0, 3.0)
        loss = score_gan_loss(fakes, gaussian_denoiser(2.0, 0.49), gaussian_denoiser(b, a**2), sigma).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert abs(gen.weight.item()) == pytest.approx(0.7, abs=1e-3) and gen.bias.item() == pytest.approx(2.0, abs=1e-3)


def test_score_gan_generators():
    g = build_score_gan_generator("mlp", dim=2, z_dim=8, width=16, depth=2)
    assert g(torch.randn(3, 8)).shape == (3, 2) and g.sample_shape == (2,) and g.n_classes == 0
    assert build_score_gan_generator("dcgan", img_size=32, z_dim=8, base_dim=4)(torch.randn(2, 8)).shape == (
        2,
        1,
        32,
        32,
    )
    with pytest.raises(KeyError, match="valid"):
        build_score_gan_generator("fastgan")
